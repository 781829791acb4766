using Vmm.Mm;

namespace Vmm.Tests.Ksm;

/// <summary>
/// What the KSM tests share beyond <see cref="TestMachines"/> (whose <see cref="TestMachines.CreateForKsm"/>
/// builds their machine): a patterned mergeable mapping.
/// </summary>
internal static class KsmTestKit
{
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
