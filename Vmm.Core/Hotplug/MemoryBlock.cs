// MemoryBlock: one memory block as a device (Linux's /sys/devices/system/memory/memoryN): its
// attributes (state, valid_zones, phys_index, removable, node), the state writes, and Vmm's typed calls
// (Offline with cancellation and progress, the CanOffline dry run). The work is MemoryHotplug's.
using System.Globalization;
using Vmm.Memory;

namespace Vmm;

/// <summary>
/// One memory block of a machine (128 MiB by default, <see cref="MachineOptions.BlockSizeBytes"/>): the
/// unit that goes online and offline. Get it from <see cref="MemoryHotplug.Blocks"/>.
/// </summary>
/// <remarks>This type is thread-safe: state changes are serialised by the machine's hotplug lock.</remarks>
public sealed class MemoryBlock
{
    private readonly MemoryHotplug _hotplug;
    private readonly Machine _machine;

    internal MemoryBlock(MemoryHotplug hotplug, Machine machine, int index)
    {
        _hotplug = hotplug;
        _machine = machine;
        Index = index;
        Node = machine.Topology.NodeOfBlock(index);
        StartPfn = machine.Topology.FirstPfnOfBlock(index);
        Frames = machine.Topology.FramesPerBlock;
    }

    /// <summary>phys_index: the block's number (its first frame divided by the frames per block).</summary>
    public int Index { get; }

    /// <summary>The NUMA node the block belongs to.</summary>
    public int Node { get; }

    /// <summary>The block's first frame.</summary>
    public long StartPfn { get; }

    /// <summary>Frames in the block.</summary>
    public long Frames { get; }

    /// <summary>state: "online", "going-offline" (being emptied) or "offline"; "removed" once <see cref="MemoryHotplug.RemoveMemory"/> took it out.</summary>
    public string State => _machine.Allocator.GetBlockState(Index) switch
    {
        MemoryBlockState.Online => "online",
        MemoryBlockState.GoingOffline => "going-offline",
        MemoryBlockState.Offline => "offline",
        _ => "removed",
    };

    /// <summary>True while the block is online (going-offline counts as online: it still holds pages).</summary>
    public bool IsOnline => _machine.Allocator.IsBlockOnline(Index);

    /// <summary>The zone of an online block; null while it is offline.</summary>
    public ZoneType? Zone => _machine.Allocator.ZoneTypeOfBlock(Index);

    /// <summary>
    /// valid_zones: for an online block its zone ("Normal" or "Movable"); for an offline block the zones it
    /// can be onlined to, the default (what "online" picks) first, separated by a space.
    /// </summary>
    public string ValidZones => string.Join(' ', _hotplug.ValidZonesOf(Index).Select(z => z == ZoneType.Normal ? "Normal" : "Movable"));

    /// <summary>
    /// removable: always true, as in Linux since 5.x (hot-remove is built in; whether an offline would
    /// succeed now is <see cref="CanOffline"/>'s question, which Linux stopped answering here because the
    /// answer changes from one moment to the next).
    /// </summary>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Performance", "CA1822", Justification = "An attribute of a block, like its siblings; Linux answers the same for every block.")]
    public bool Removable => true;

    /// <summary>
    /// Reads one attribute as its sysfs file would show it (without the newline): "state", "valid_zones",
    /// "phys_index" (8 hex digits), "removable" ("1"), "node" (a number; Linux shows a nodeN link).
    /// </summary>
    /// <returns><see cref="Errno.None"/>, or ENOENT for an attribute that does not exist.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="attribute"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno TryRead(string attribute, out string value)
    {
        ArgumentNullException.ThrowIfNull(attribute);
        using MachineCall call = _machine.EnterCall();
        value = attribute switch
        {
            "state" => State,
            "valid_zones" => ValidZones,
            "phys_index" => Index.ToString("x8", CultureInfo.InvariantCulture),
            "removable" => Removable ? "1" : "0",
            "node" => Node.ToString(CultureInfo.InvariantCulture),
            _ => "",
        };
        return value.Length == 0 ? Errno.ENOENT : Errno.None;
    }

    /// <summary>
    /// Writes one attribute as a write to its sysfs file would: only "state" is writable, with "online"
    /// (the default zone, the first of valid_zones), "online_kernel" (ZONE_NORMAL), "online_movable"
    /// (ZONE_MOVABLE) or "offline" (unbounded by anything but <see cref="MemoryHotplug.OfflineMigrateMaxPasses"/>;
    /// <see cref="Offline"/> takes a token and says why it failed). A trailing newline is ignored.
    /// </summary>
    /// <returns><see cref="Errno.None"/>; EINVAL for a bad string, a zone the block cannot take, or a block
    /// already in that state; EBUSY, ENOMEM or a notifier's veto from an offline (see <see cref="OfflineResult.Error"/>);
    /// EACCES for a read-only attribute; ENOENT for one that does not exist.</returns>
    /// <exception cref="ArgumentNullException">an argument is null.</exception>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Write(string attribute, string value)
    {
        ArgumentNullException.ThrowIfNull(attribute);
        ArgumentNullException.ThrowIfNull(value);
        using MachineCall call = _machine.EnterCall();
        return attribute switch
        {
            "state" => _hotplug.WriteState(this, value),
            "valid_zones" or "phys_index" or "removable" or "node" => Errno.EACCES,
            _ => Errno.ENOENT,
        };
    }

    /// <summary>Brings the offline block online in <paramref name="zone"/> (null: its default zone). Its memory comes back lazily, as it is used.</summary>
    /// <returns><see cref="Errno.None"/>; EINVAL if the block is not offline or cannot take that zone; a notifier's veto.</returns>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Online(ZoneType? zone = null)
    {
        using MachineCall call = _machine.EnterCall();
        return _hotplug.Online(this, zone);
    }

    /// <summary>
    /// offline_pages: empties the block (every page in use migrates to other memory, KSM pages keeping
    /// their sharing), takes it out of its zone, and gives its memory back to the operating system.
    /// Processes, KSM and migration keep running meanwhile. On failure the block is online again as it
    /// was, and the result says which frames kept it and why.
    /// </summary>
    /// <param name="progress">told after each pass over the block.</param>
    /// <param name="cancellationToken">a pending signal: the offline stops with EINTR and is undone.</param>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public OfflineResult Offline(IProgress<OfflineProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        using MachineCall call = _machine.EnterCall();
        return _hotplug.Offline(this, progress, cancellationToken);
    }

    /// <summary>
    /// A dry run of <see cref="Offline"/>: whether the block could go offline now, and if not, which frames
    /// would keep it (pinned pages with the process and address that pin them, unmovable pages, not enough
    /// free memory elsewhere). Changes nothing. The answer can be out of date a moment later.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public bool CanOffline(out IReadOnlyList<OfflineBlocker> blockers)
    {
        using MachineCall call = _machine.EnterCall();
        blockers = _hotplug.FindBlockers(this, dryRun: true);
        return blockers.Count == 0;
    }

    /// <inheritdoc/>
    public override string ToString() => $"memory{Index} (node {Node}, {State})";
}
