using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Exceptions say what was wrong: an exited process is InvalidOperationException, out of frames is
/// InsufficientMemoryException, protection bits follow Linux's mmap and mprotect, and
/// PR_GET_MEMORY_MERGE is EINVAL without KSM.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class ExceptionContractTests
{
    private const ulong Page = 4096;

    [Test]
    public void Every_throwing_call_on_an_exited_process_is_an_InvalidOperationException()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * Page);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Fill(va, 2 * Page, 3);
        p.Exit();
        Assert.Throws<InvalidOperationException>(() => p.Read(va, new byte[8]), "Read");
        Assert.Throws<InvalidOperationException>(() => p.Read<int>(va), "Read<T>");
        Assert.Throws<InvalidOperationException>(() => p.Write(va, new byte[8]), "Write");
        Assert.Throws<InvalidOperationException>(() => p.Write(va, 1), "Write<T>");
        Assert.Throws<InvalidOperationException>(() => p.Fill(va, Page, 1), "Fill");
        Assert.Throws<InvalidOperationException>(() => p.Pin(va, Page, write: false), "Pin");
        Assert.Throws<InvalidOperationException>(() => p.GetPagemap(va), "GetPagemap");
        Assert.Throws<InvalidOperationException>(() => p.Mmap(Page), "Mmap(length)");
        Assert.Throws<InvalidOperationException>(() => p.Fork(), "Fork");
        Assert.That(p.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM), "the errno form stays ENOMEM");
        Assert.That(machine.Audit(), Is.Empty);
    }

    /// <summary>Takes every free frame into a hog process.</summary>
    private static void ExhaustMemory(Machine machine)
    {
        VmProcess hog = machine.CreateProcess();
        ulong size = (ulong)machine.Topology.TotalFrames * Page;
        ulong va = hog.Mmap(size);
        try
        {
            for (ulong off = 0; off < size; off += Page)
                hog.Write<byte>(va + off, 1);
        }
        catch (InsufficientMemoryException)
        {
        }
    }

    [Test]
    public void Out_of_frames_is_InsufficientMemoryException_in_every_throwing_path_and_leaves_nothing_behind()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(64 * Page, options: TestMachines.Small with { NodeCount = 1 });
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Write<byte>(va, 1); // its page table exists, so the paths below fail for want of a data frame
        ExhaustMemory(machine);
        var write = Assert.Throws<InsufficientMemoryException>(() => p.Write(va + Page, new byte[16]), "Write");
        Assert.That(write!.Message, Does.Contain($"0x{va + Page:x}"), "the message names the address");
        Assert.Throws<InsufficientMemoryException>(() => p.Write<long>(va + Page, 1), "Write<T>");
        Assert.Throws<InsufficientMemoryException>(() => p.Fill(va + Page, Page, 1), "Fill");
        Assert.Throws<InsufficientMemoryException>(() => p.Pin(va, 8 * Page, write: true), "Pin");
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero, "the page pinned before the failure was unpinned");
        int processes = machine.Processes.Count;
        Assert.Throws<InsufficientMemoryException>(() => p.Fork(), "Fork: no frame for the child's page tables");
        Assert.That(machine.Processes, Has.Count.EqualTo(processes), "no half-made child is left behind");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Mmap_ignores_protection_bits_it_does_not_know_as_Linux_does()
    {
        using var machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        foreach (int bits in new[] { 0x8, 0x10, 0x40, 0x0100_0000, 0x0200_0000 })
        {
            Assert.That(p.Mmap(0, Page, Protection.ReadWrite | (Protection)bits, MapFlags.Private, out ulong va), Is.EqualTo(Errno.None), $"PROT bit 0x{bits:x}");
            p.Write<byte>(va, 1);
            Assert.That(p.Mm.VmaAt(va)!.Flags & (VmaFlags.Read | VmaFlags.Write | VmaFlags.Exec), Is.EqualTo(VmaFlags.Read | VmaFlags.Write));
        }
        Assert.That(p.Mmap(Page, Protection.Read | Protection.Sem), Is.Not.Zero, "the throwing overload too");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Mprotect_accepts_PROT_SEM_and_rejects_unknown_bits_and_growing()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * Page);
        (Machine machine, VmProcess p, ulong va, _) = region;
        Assert.That(p.Mprotect(va, Page, Protection.Read | Protection.Sem), Is.EqualTo(Errno.None), "PROT_SEM is valid on every architecture");
        Assert.Throws<SegmentationFault>(() => p.Write<byte>(va, 1), "and it changed the protection");
        Assert.That(p.Mprotect(va, Page, (Protection)0x10), Is.EqualTo(Errno.EINVAL), "an unknown bit");
        Assert.That(p.Mprotect(va, Page, Protection.Read | Protection.GrowsDown | Protection.GrowsUp), Is.EqualTo(Errno.EINVAL), "both directions");
        Assert.That(p.Mprotect(va + 1, Page, Protection.Read), Is.EqualTo(Errno.EINVAL), "misaligned");
        Assert.That(p.Mprotect(va, Page, Protection.ReadWrite | Protection.GrowsDown), Is.EqualTo(Errno.EINVAL), "no Vmm mapping grows down");
        Assert.That(p.Mprotect(va, Page, Protection.ReadWrite | Protection.GrowsUp), Is.EqualTo(Errno.EINVAL), "nor up");
        Assert.That(p.Mprotect(0x10000, Page, Protection.ReadWrite | Protection.GrowsUp), Is.EqualTo(Errno.ENOMEM), "the VMA lookup comes first");
        Assert.Throws<SegmentationFault>(() => p.Write<byte>(va, 1), "the refused calls changed nothing");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void PR_GET_MEMORY_MERGE_is_EINVAL_without_KSM_and_reports_the_mode_with_it()
    {
        using (var bare = TestMachines.Create(TestMachines.Small with { EnableKsm = false }))
        {
            VmProcess p = bare.CreateProcess();
            Assert.That(p.GetMemoryMerge(out bool enabled), Is.EqualTo(Errno.EINVAL));
            Assert.That(enabled, Is.False);
            Assert.That(p.IsMemoryMergeEnabled, Is.False);
            Assert.That(p.ReadKsmStat("ksm_merge_any", out _), Is.EqualTo(Errno.ENOENT), "no /proc/pid/ksm_stat without KSM");
        }
        using var machine = TestMachines.Create();
        VmProcess q = machine.CreateProcess();
        Assert.That(q.GetMemoryMerge(out bool before), Is.EqualTo(Errno.None));
        Assert.That(before, Is.False);
        Assert.That(q.SetMemoryMerge(true), Is.EqualTo(Errno.None));
        Assert.That(q.GetMemoryMerge(out bool after), Is.EqualTo(Errno.None));
        Assert.That(after, Is.True);
        Assert.That(q.ReadKsmStat("ksm_merge_any", out long mergeAny), Is.EqualTo(Errno.None));
        Assert.That(mergeAny, Is.EqualTo(1));
        Assert.That(q.ReadKsmStat("ksm_no_such_field", out _), Is.EqualTo(Errno.ENOENT));
        Assert.Throws<ArgumentNullException>(() => q.ReadKsmStat(null!, out _));
    }

    [Test]
    public void An_exit_racing_an_access_ends_it_with_InvalidOperationException_or_a_fault_with_reason_Exited()
    {
        // The entry check turns a call into an exited process away; an exit that begins while an access
        // is under way is found by the access's next fault, which reports SegvReason.Exited. Nothing else
        // may come out, and the machine stays consistent.
        int rounds = 20 * TestEnvironment.StressScale;
        using var machine = TestMachines.Create();
        for (int round = 0; round < rounds; round++)
        {
            VmProcess p = machine.CreateProcess();
            ulong length = 64 * Page;
            ulong va = p.Mmap(length);
            using var started = new ManualResetEventSlim();
            Exception? outcome = null;
            var filler = new Thread(() =>
            {
                try
                {
                    started.Set();
                    while (true)
                    {
                        p.Fill(va, length, (byte)round);
                        p.Madvise(va, length, Advice.DontNeed); // so that the next Fill faults again
                    }
                }
                catch (Exception e)
                {
                    outcome = e;
                }
            });
            filler.Start();
            started.Wait();
            Thread.Sleep(round % 3);
            p.Exit();
            filler.Join();
            Assert.That(outcome, Is.InstanceOf<InvalidOperationException>()
                .Or.Matches<Exception>(e => e is SegmentationFault { Reason: SegvReason.Exited }), $"round {round}: {outcome}");
        }
        Assert.That(machine.Audit(), Is.Empty);
    }
}
