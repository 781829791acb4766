using Vmm.Mm;

namespace Vmm.Tests.Ksm;

/// <summary>What the KSM tests share: a small machine, a patterned mergeable mapping, the audit.</summary>
internal static class KsmTestKit
{
    /// <summary>2 nodes of 32 MiB in 8 MiB blocks, no watermark reserve.</summary>
    public static Machine NewMachine(bool ksm = true) => new(new MachineOptions
    {
        NodeCount = 2, NodeSizeBytes = 32L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0, EnableKsm = ksm,
    });

    public static void AssertAuditClean(Machine machine) => Assert.That(machine.Audit(), Is.Empty, "Audit recounts everything from the page tables");

    /// <summary>Maps <paramref name="pages"/> pages, fills page i with the byte pattern(i), and advises them mergeable.</summary>
    public static ulong MapPattern(VmProcess p, int pages, Func<int, byte> pattern, bool mergeable = true)
    {
        ulong va = p.Mmap((ulong)pages * 4096);
        for (int i = 0; i < pages; i++)
            p.Fill(va + (ulong)i * 4096, 4096, pattern(i));
        if (mergeable)
            Assert.That(p.Madvise(va, (ulong)pages * 4096, Advice.Mergeable), Is.EqualTo(Errno.None));
        return va;
    }
}
