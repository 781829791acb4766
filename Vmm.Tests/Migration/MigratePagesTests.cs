using Vmm.Migration;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// migrate_pages (VmProcess.MigratePages, Migration/PageMoves.cs): the validation, the pairing of old and
/// new nodes (node_remap and do_migrate_pages' order), shared and pinned pages, and the count not moved.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class MigratePagesTests
{
    private const int Page = 4096;

    private static MachineOptions ThreeNodes => TestMachines.TwoNodes with { NodeCount = 3 };

    private static MachineOptions FourNodes => TestMachines.TwoNodes with { NodeCount = 4 };

    /// <summary>Maps one page on each given node (by moving it there) and writes its index into it.</summary>
    private static ulong MapPagesOn(VmProcess p, params int[] nodes)
    {
        ulong va = p.Mmap((ulong)(nodes.Length * Page));
        for (int i = 0; i < nodes.Length; i++)
        {
            ulong page = va + (ulong)(i * Page);
            p.Write<int>(page, 1000 + i);
            var status = new int[1];
            Assert.That(p.MovePages(0, [page], [nodes[i]], status), Is.EqualTo(Errno.None));
            Assert.That(status[0], Is.EqualTo(nodes[i]), "setup: page placed");
        }
        return va;
    }

    private static void AssertContents(VmProcess p, ulong va, int count)
    {
        for (int i = 0; i < count; i++)
            Assert.That(p.Read<int>(va + (ulong)(i * Page)), Is.EqualTo(1000 + i), $"page {i} kept its contents");
    }

    /// <summary>
    /// On <paramref name="machine"/>, a new process maps one page on each of <paramref name="pagesOn"/> (see
    /// <see cref="MapPagesOn"/>) and calls migrate_pages on itself from <paramref name="from"/> to
    /// <paramref name="to"/>; asserts the call succeeds with no page left unmoved, the pages' nodes then
    /// satisfy <paramref name="expectedNodes"/>, every page kept its contents, and the audit is clean.
    /// Precondition: <paramref name="machine"/> has every node named.
    /// </summary>
    private static void AssertMigratesOwnPages(Machine machine, int[] pagesOn, NodeMask from, NodeMask to, NUnit.Framework.Constraints.IResolveConstraint expectedNodes)
    {
        VmProcess p = machine.CreateProcess();
        ulong va = MapPagesOn(p, pagesOn);
        Assert.That(p.MigratePages(0, from, to, out long notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodesOf(p, va, pagesOn.Length), expectedNodes);
        AssertContents(p, va, pagesOn.Length);
        TestMachines.AssertAuditClean(machine);
    }

    // ---------------------------------------------------------------------------------------------
    // Validation
    // ---------------------------------------------------------------------------------------------

    [Test]
    public void Empty_masks_are_EINVAL()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 1, options: TestMachines.TwoNodes);
        VmProcess p = region.Process;
        Assert.That(p.MigratePages(0, NodeMask.Empty, NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Empty, out notMoved), Is.EqualTo(Errno.EINVAL));
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodeOf(p, region.Va), Is.Zero);
    }

    [TestCase(2)]
    [TestCase(63)]
    public void A_node_the_machine_does_not_have_in_either_mask_is_EINVAL(int badNode)
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 1, options: TestMachines.TwoNodes);
        VmProcess p = region.Process;
        Assert.That(p.MigratePages(0, NodeMask.Of(0, badNode), NodeMask.Of(1), out _), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1, badNode), out _), Is.EqualTo(Errno.EINVAL));
        Assert.That(NodeOf(p, region.Va), Is.Zero, "nothing moved");
    }

    [Test]
    public void An_unknown_or_gone_process_is_ESRCH()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess caller = machine.CreateProcess();
        VmProcess gone = machine.CreateProcess();
        gone.Exit();
        Assert.That(caller.MigratePages(4242, NodeMask.Of(0), NodeMask.Of(1), out _), Is.EqualTo(Errno.ESRCH));
        Assert.That(caller.MigratePages(gone.Pid, NodeMask.Of(0), NodeMask.Of(1), out _), Is.EqualTo(Errno.ESRCH));
    }

    [Test]
    public void The_process_itself_after_exit_is_EINVAL()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        p.Exit();
        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out _), Is.EqualTo(Errno.EINVAL));
    }

    [Test]
    public void Another_user_process_needs_CAP_SYS_NICE_and_the_current_credentials_count()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess caller = machine.CreateProcess();
        VmProcess other = machine.CreateProcess(Credentials.User(1000));
        ulong va = other.Mmap(2 * Page);
        other.Fill(va, 2 * Page, 1);

        Assert.That(caller.SetEuid(5000), Is.EqualTo(Errno.None), "an effective uid leaving 0 clears CAP_SYS_NICE");
        Assert.That(caller.MigratePages(other.Pid, NodeMask.Of(0), NodeMask.Of(1), out _), Is.EqualTo(Errno.EPERM));
        Assert.That(NodeOf(other, va), Is.Zero);

        Assert.That(caller.SetEuid(0), Is.EqualTo(Errno.None));
        Assert.That(caller.SetEuid(1000), Is.EqualTo(Errno.None), "effective uid 1000, the target's");
        Assert.That(caller.MigratePages(other.Pid, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodesOf(other, va, 2), Is.All.EqualTo(1));

        VmProcess stranger = machine.CreateProcess(Credentials.User(2000));
        Assert.That(stranger.MigratePages(other.Pid, NodeMask.Of(1), NodeMask.Of(0), out _), Is.EqualTo(Errno.EPERM));
        TestMachines.AssertAuditClean(machine);
    }

    // ---------------------------------------------------------------------------------------------
    // Moving
    // ---------------------------------------------------------------------------------------------

    [Test]
    public void Every_page_on_the_old_node_moves_to_the_new_one_byte_identical()
    {
        const int count = 48;
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(count * Page);
        byte[] bytes = WriteRandomPages(p, va, count, seed: 11);
        _ = p.Read<int>(p.Mmap(Page)); // a zero-page mapping: not a page of the process, never moved

        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));

        Assert.That(notMoved, Is.Zero);
        Assert.That(NodesOf(p, va, count), Is.All.EqualTo(1));
        Assert.That(ReadPages(p, va, count), Is.EqualTo(bytes));
        Assert.That(p.RssAnonPages, Is.EqualTo(count));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Pages_on_nodes_outside_the_old_mask_stay()
    {
        using Machine machine = TestMachines.Create(ThreeNodes);
        AssertMigratesOwnPages(machine, [0, 1, 2, 0], NodeMask.Of(0), NodeMask.Of(2), Is.EqualTo(Expected(2, 1, 2, 2)));
    }

    [Test]
    public void A_shift_by_one_node_keeps_the_layout_by_moving_off_a_node_before_onto_it()
    {
        // [0,1] -> [1,2]: node 0's pages go to 1 and node 1's to 2. Moving 0 -> 1 first would then carry
        // node 0's pages on to 2 with node 1's; do_migrate_pages moves 1 -> 2 first.
        using Machine machine = TestMachines.Create(ThreeNodes);
        AssertMigratesOwnPages(machine, [0, 1, 0, 1], NodeMask.Of(0, 1), NodeMask.Of(1, 2), Is.EqualTo(Expected(1, 2, 1, 2)));
    }

    [Test]
    public void Masks_are_sets_so_asking_to_swap_two_nodes_moves_nothing()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        // "[0,1] -> [1,0]" is [0,1] -> [0,1]: every node maps to itself, as in Linux.
        AssertMigratesOwnPages(machine, [0, 1, 1, 0], NodeMask.Of(0, 1), NodeMask.Of(1, 0), Is.EqualTo(Expected(0, 1, 1, 0)));
    }

    [Test]
    public void With_masks_of_different_sizes_a_node_in_both_keeps_its_pages()
    {
        using Machine machine = TestMachines.Create(FourNodes);
        // [0-3] -> [1]: 0, 2 and 3 go to node 1 (remapped by position, wrapping); node 1 is in both.
        AssertMigratesOwnPages(machine, [0, 1, 2, 3], NodeMask.Of(0, 1, 2, 3), NodeMask.Of(1), Is.All.EqualTo(1));
    }

    [Test]
    public void Node_remap_maps_by_position_and_wraps()
    {
        NodeMask from = NodeMask.Of(0, 2, 5), to = NodeMask.Of(1, 3);
        Assert.That(PageMoves.NodeRemap(0, from, to), Is.EqualTo(1));
        Assert.That(PageMoves.NodeRemap(2, from, to), Is.EqualTo(3));
        Assert.That(PageMoves.NodeRemap(5, from, to), Is.EqualTo(1), "the third old node wraps to the first new one");
        Assert.That(PageMoves.NodeRemap(4, from, to), Is.EqualTo(4), "a node outside the old mask maps to itself");
        Assert.That(PageMoves.NodeRemap(2, from, NodeMask.Empty), Is.EqualTo(2));
    }

    [Test]
    public void A_pinned_page_is_counted_as_not_moved()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4 * Page);
        p.Fill(va, 4 * Page, 6);
        using (PinnedMemory pin = p.Pin(va + Page, Page, write: false))
        {
            Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));
            Assert.That(notMoved, Is.EqualTo(1));
            Assert.That(NodesOf(p, va, 4), Is.EqualTo(Expected(1, 0, 1, 1)));
            Assert.That(machine.ReadVmStat("nr_isolated_anon", out long isolated), Is.EqualTo(Errno.None));
            Assert.That(isolated, Is.Zero, "the pinned page went back on its LRU list");
            TestMachines.AssertAuditClean(machine);
        }
        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out long rest), Is.EqualTo(Errno.None));
        Assert.That(rest, Is.Zero);
        Assert.That(NodesOf(p, va, 4), Is.All.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_shared_page_moves_only_with_CAP_SYS_NICE_and_staying_is_not_a_failure()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess parent = machine.CreateProcess(Credentials.User(1000));
        ulong va = parent.Mmap(2 * Page);
        parent.Fill(va, 2 * Page, 0x21);
        VmProcess child = parent.Fork();
        child.Write<byte>(va + Page, 0x22); // the child's own copy: the parent's second page is exclusive again

        Assert.That(parent.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero, "a shared page left alone is not a failure (MPOL_MF_MOVE)");
        Assert.That(NodeOf(parent, va), Is.Zero);
        Assert.That(NodeOf(parent, va + Page), Is.EqualTo(1));

        VmProcess admin = machine.CreateProcess();
        Assert.That(admin.MigratePages(parent.Pid, NodeMask.Of(0), NodeMask.Of(1), out notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodeOf(parent, va), Is.EqualTo(1), "CAP_SYS_NICE: MPOL_MF_MOVE_ALL");
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(parent.GetPagemap(va).Pfn), "the child's mapping followed");
        Assert.That(child.Read<byte>(va), Is.EqualTo(0x21));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_shared_mapping_page_of_another_process_moves_for_every_process_that_maps_it()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.Mmap(0, Page, Protection.ReadWrite, MapFlags.Shared, out ulong first), Is.EqualTo(Errno.None));
        p.Write<int>(first, 5);
        VmProcess child = p.Fork();
        // Root has CAP_SYS_NICE: the page mapped by both moves (MPOL_MF_MOVE_ALL).
        Assert.That(p.MigratePages(child.Pid, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodeOf(child, first), Is.EqualTo(1));
        Assert.That(NodeOf(p, first), Is.EqualTo(1), "one page: both mappings follow");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_KSM_page_mapped_twice_in_one_process_is_moved_once_and_only_with_CAP_SYS_NICE()
    {
        using Machine machine = TestMachines.CreateForKsm();
        VmProcess p = machine.CreateProcess(Credentials.User(1000));
        ulong va = p.Mmap(3 * Page);
        p.Fill(va, 2 * Page, 0x6B);   // two equal pages: merged into one KSM page mapped twice
        p.Fill(va + 2 * Page, Page, 0x01);
        Assert.That(p.Madvise(va, 3 * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(2);
        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(p.GetPagemap(va + Page).Pfn), "setup: one KSM page at both addresses");

        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero, "the shared KSM page stays without CAP_SYS_NICE, and that is no failure");
        Assert.That(NodesOf(p, va, 3), Is.EqualTo(Expected(0, 0, 1)));

        VmProcess admin = machine.CreateProcess();
        Assert.That(admin.MigratePages(p.Pid, NodeMask.Of(0), NodeMask.Of(1), out notMoved), Is.EqualTo(Errno.None));
        Assert.That(notMoved, Is.Zero, "met at two addresses, taken once: the second sight is not a failed isolation");
        Assert.That(NodesOf(p, va, 3), Is.All.EqualTo(1));
        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(p.GetPagemap(va + Page).Pfn), "still one KSM page");
        Assert.That(p.Read<byte>(va + Page + 5), Is.EqualTo(0x6B));
        TestMachines.AssertAuditClean(machine);
    }
}
