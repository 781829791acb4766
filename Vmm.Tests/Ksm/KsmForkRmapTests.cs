using Vmm.Mm;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

/// <summary>KSM pages and fork: every mapping of a KSM page stays reachable through the reverse map.</summary>
[TestFixture]
[Category("Ksm")]
[Category("Smoke")]
public sealed class KsmForkRmapTests
{
    [Test]
    public void A_page_shared_copy_on_write_with_a_process_that_never_opted_in_is_not_made_a_KSM_page_in_place()
    {
        // Found by the API fuzzer: the child of a plain process opts in (PR_SET_MEMORY_MERGE) and KSM turned
        // its pages, still shared copy-on-write with the parent, into KSM pages in place. The parent then mapped
        // KSM pages that no rmap item leads to (the items name the child's anon_vma), and Audit said
        // "the reverse map of KSM page N does not find it".
        using Machine machine = CreateForKsm();
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(11 * 4096, flags: MapFlags.Private | MapFlags.Populate);
        VmProcess child = parent.Fork();
        Assert.That(child.SetMemoryMerge(true), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(3);
        AssertAuditClean(machine);
        Assert.That(parent.GetPagemap(va).Ksm, Is.False, "the parent never opted in: its pages are not KSM pages");

        // Once the child has its own copies, they merge.
        child.Fill(va, 11 * 4096, 1);
        machine.Ksm.RunFullScans(4);
        Assert.That(child.GetPagemap(va).Ksm, Is.True, "exclusive pages merge");
        AssertAuditClean(machine);
        child.Exit();
        parent.Exit();
        AssertAuditClean(machine);
    }
}
