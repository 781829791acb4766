using Vmm.Memory;

namespace Vmm.Tests.Migration;

/// <summary>
/// What the migration tests (move_pages, migrate_pages, mbind, cpusets, the engine, KSM migration) share
/// beyond <see cref="TestMachines"/>: where a page is, pages of known random bytes, a frame on a given
/// node, and the last steps of a migration a test drives by hand. Import it with
/// <c>using static Vmm.Tests.Migration.MigrationTestHelpers;</c>.
/// </summary>
internal static class MigrationTestHelpers
{
    private const int PageSize = 4096;

    /// <summary>
    /// The node of the page mapped at <paramref name="va"/> in <paramref name="p"/>, as the pagemap reports
    /// it (the pagemap entry's node, whatever is or is not mapped there).
    /// </summary>
    public static int NodeOf(VmProcess p, ulong va) => p.GetPagemap(va).Node;

    /// <summary>
    /// The nodes of the <paramref name="count"/> consecutive pages from <paramref name="va"/> in
    /// <paramref name="p"/>, in address order (see <see cref="NodeOf"/>).
    /// </summary>
    public static int[] NodesOf(VmProcess p, ulong va, int count) =>
        [.. Enumerable.Range(0, count).Select(i => NodeOf(p, va + (ulong)(i * PageSize)))];

    /// <summary>The given values as an array, for an expected per-page status or node list.</summary>
    public static int[] Expected(params int[] values) => values;

    /// <summary>
    /// Writes <paramref name="pages"/> pages of random bytes (from <c>new Random(seed)</c>, so the same seed
    /// gives the same bytes) at <paramref name="va"/> in <paramref name="p"/> and returns them. The range
    /// must be mapped writable.
    /// </summary>
    public static byte[] WriteRandomPages(VmProcess p, ulong va, int pages, int seed)
    {
        var bytes = new byte[pages * PageSize];
        new Random(seed).NextBytes(bytes);
        p.Write(va, bytes);
        return bytes;
    }

    /// <summary>
    /// Reads the <paramref name="pages"/> pages from <paramref name="va"/> in <paramref name="p"/>. The range
    /// must be mapped readable.
    /// </summary>
    public static byte[] ReadPages(VmProcess p, ulong va, int pages)
    {
        var bytes = new byte[pages * PageSize];
        p.Read(va, bytes);
        return bytes;
    }

    /// <summary>
    /// Allocates one movable, unzeroed frame on <paramref name="node"/> only (no fallback to another node),
    /// as a migration target; <see cref="PageAllocator.NoPfn"/> when that node has none. The caller owns
    /// the frame's reference.
    /// </summary>
    public static long AllocOnNode(Machine machine, int node) =>
        machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, node);

    /// <summary>
    /// The last steps of a migration a test drives by hand, in the engine's order: the migration entries of
    /// <paramref name="oldPfn"/> are replaced by PTEs of <paramref name="newPfn"/>, the new frame joins the
    /// LRU, and both frames are unlocked and lose the migrator's reference (the new one first).
    /// Precondition: the test holds a reference to and the page lock of both frames, the old frame's
    /// mappings were turned into migration entries (<c>Rmap.TryToMigrate</c>) and its contents copied.
    /// </summary>
    public static void FinishMigration(Machine machine, long oldPfn, long newPfn)
    {
        machine.Rmap.RemoveMigrationPtes(oldPfn, newPfn);
        machine.Lru.Add(newPfn);
        machine.PageLock.Unlock(newPfn);
        machine.PutPage(newPfn);
        machine.PageLock.Unlock(oldPfn);
        machine.PutPage(oldPfn);
    }
}
