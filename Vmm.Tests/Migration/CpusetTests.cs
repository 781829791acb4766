using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// Cpusets (Migration/Cpuset.cs): the tree and its errors, allocation kept inside a cpuset's mems, and
/// memory policies rebound when the mems change or a process moves.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class CpusetTests
{
    private const ulong Page = 4096;

    private static NodeMask PolicyNodes(VmProcess p)
    {
        Assert.That(p.GetMempolicy(out _, out NodeMask nodes), Is.EqualTo(Errno.None));
        return nodes;
    }

    private static NodeMask PolicyNodesAt(VmProcess p, ulong va)
    {
        Assert.That(p.GetMempolicy(out _, out NodeMask nodes, va, GetMempolicyFlags.Address), Is.EqualTo(Errno.None));
        return nodes;
    }

    /// <summary>The node of a page written now at a fresh address.</summary>
    private static int NodeOfNewPage(VmProcess p)
    {
        ulong va = p.Mmap(Page);
        p.Write<long>(va, 1);
        return NodeOf(p, va);
    }

    [Test]
    public void Every_process_starts_in_the_root_cpuset_which_has_every_node()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        Assert.That(machine.RootCpuset.Mems, Is.EqualTo(NodeMask.Of(0, 1, 2, 3)));
        Assert.That(machine.RootCpuset.Parent, Is.Null);
        Assert.That(p.Cpuset, Is.SameAs(machine.RootCpuset));
        Assert.That(machine.RootCpuset.Processes, Is.EqualTo(new[] { p }));
        Assert.That(machine.RootCpuset.SetMems(NodeMask.Of(0)), Is.EqualTo(Errno.EACCES), "the root's mems are read-only");
    }

    [Test]
    public void Creating_a_cpuset_checks_name_and_mems()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset a = machine.CreateCpuset("a", NodeMask.Of(0, 1));
        Assert.That((a.Name, a.Parent, a.Mems, a.MemoryMigrate), Is.EqualTo(("a", machine.RootCpuset, NodeMask.Of(0, 1), false)));
        Assert.That(machine.RootCpuset.Children, Is.EqualTo(new[] { a }));
        Assert.Throws<ArgumentException>(() => machine.CreateCpuset("a", NodeMask.Of(0)), "the name is taken");
        Assert.Throws<ArgumentException>(() => machine.CreateCpuset("x/y", NodeMask.Of(0)));
        Assert.Throws<ArgumentException>(() => machine.CreateCpuset("", NodeMask.Of(0)));
        Assert.Throws<ArgumentException>(() => machine.CreateCpuset("b", NodeMask.Of(4)), "no node 4");
        Assert.Throws<ArgumentException>(() => machine.CreateCpuset("b", NodeMask.Of(2), a), "not inside the parent's mems");
        Cpuset b = machine.CreateCpuset("b", NodeMask.Of(1), a);
        Assert.That(b.Parent, Is.SameAs(a));
        Assert.That(machine.CreateCpuset("empty", NodeMask.Empty).Mems, Is.EqualTo(NodeMask.Empty), "a v1 cpuset may start empty");
    }

    [Test]
    public void Writing_mems_returns_Linuxs_errors()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset a = machine.CreateCpuset("a", NodeMask.Of(0, 1, 2));
        Cpuset b = machine.CreateCpuset("b", NodeMask.Of(1, 2), a);
        Assert.That(a.SetMems(NodeMask.Of(0, 1, 5)), Is.EqualTo(Errno.EINVAL), "node 5 does not exist");
        Assert.That(b.SetMems(NodeMask.Of(3)), Is.EqualTo(Errno.EACCES), "outside the parent's mems (cgroup v1)");
        Assert.That(a.SetMems(NodeMask.Of(0, 1)), Is.EqualTo(Errno.EBUSY), "the child's node 2 would be outside");
        Assert.That(b.SetMems(NodeMask.Empty), Is.EqualTo(Errno.None), "empty is fine without processes");
        Assert.That(b.Attach(machine.CreateProcess()), Is.EqualTo(Errno.ENOSPC), "no memory to attach to");
        Assert.That(b.SetMems(NodeMask.Of(2)), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        Assert.That(b.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(b.SetMems(NodeMask.Empty), Is.EqualTo(Errno.ENOSPC), "a cpuset with processes cannot lose all its mems");
        Assert.That(b.SetMems(NodeMask.Of(2)), Is.EqualTo(Errno.None), "writing the same mems");
        Assert.That(b.Mems, Is.EqualTo(NodeMask.Of(2)));
        p.Exit();
        Assert.That(b.Attach(p), Is.EqualTo(Errno.ESRCH), "an exited process");
        Assert.That(b.Processes, Is.Empty, "exit leaves the cpuset");
        Assert.That(b.SetMems(NodeMask.Empty), Is.EqualTo(Errno.None));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Allocation_stays_inside_the_cpusets_mems_whatever_the_home_node()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        Cpuset cs = machine.CreateCpuset("job", NodeMask.Of(2, 3));
        Assert.That(cs.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(p.Cpuset, Is.SameAs(cs));
        Assert.That(machine.RootCpuset.Processes, Is.Empty);
        ulong va = p.Mmap(16 * Page);
        p.Fill(va, 16 * Page, 1);
        for (ulong i = 0; i < 16; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.AnyOf(2, 3), $"page {i}");

        Assert.That(p.SetMempolicy(MempolicyMode.Preferred, NodeMask.Of(0)), Is.EqualTo(Errno.EINVAL), "no preferred node inside the mems");
        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(0, 3)), Is.EqualTo(Errno.None));
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(3)), "the nodes are cut to the mems");
        Assert.That(p.Mbind(va, Page, MempolicyMode.Interleave, NodeMask.Of(1)), Is.EqualTo(Errno.EINVAL));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_cpuset_limits_shared_memory_and_copy_on_write_copies_too()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        ulong va = parent.Mmap(Page);
        parent.Write<long>(va, 1);
        VmProcess child = parent.Fork();
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(1));
        Assert.That(cs.Attach(child), Is.EqualTo(Errno.None));
        child.Write<long>(va, 2);
        Assert.That(NodeOf(child, va), Is.EqualTo(1), "the copy-on-write copy");
        Assert.That(child.Mmap(0, 2 * Page, Protection.ReadWrite, MapFlags.Shared, out ulong shared), Is.EqualTo(Errno.None));
        child.Fill(shared, 2 * Page, 3);
        Assert.That(new[] { NodeOf(child, shared), NodeOf(child, shared + Page) }, Is.All.EqualTo(1), "shared memory");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Fork_puts_the_child_in_its_parents_cpuset_and_exit_takes_it_out()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(3));
        VmProcess parent = machine.CreateProcess();
        cs.Attach(parent);
        VmProcess child = parent.Fork();
        Assert.That(child.Cpuset, Is.SameAs(cs));
        Assert.That(cs.Processes, Is.EqualTo(new[] { parent, child }));
        Assert.That(child.GetMempolicy(out _, out NodeMask mems, 0, GetMempolicyFlags.MemsAllowed), Is.EqualTo(Errno.None));
        Assert.That(mems, Is.EqualTo(NodeMask.Of(3)));
        Assert.That(NodeOfNewPage(child), Is.EqualTo(3));
        child.Exit();
        Assert.That(cs.Processes, Is.EqualTo(new[] { parent }));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Changing_mems_remaps_a_policy_without_flags_node_by_rank()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(0, 1));
        VmProcess p = machine.CreateProcess();
        cs.Attach(p);
        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        ulong va = p.Mmap(4 * Page);
        Assert.That(p.Mbind(va, 4 * Page, MempolicyMode.Interleave, NodeMask.Of(0, 1)), Is.EqualTo(Errno.None));
        Assert.That(cs.SetMems(NodeMask.Of(2, 3)), Is.EqualTo(Errno.None));
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(3)), "node 1, second of {0,1}, becomes the second of {2,3}");
        Assert.That(PolicyNodesAt(p, va), Is.EqualTo(NodeMask.Of(2, 3)), "the VMA policy is rebound too");
        Assert.That(NodeOfNewPage(p), Is.EqualTo(3));
        p.Fill(va, 4 * Page, 1);
        for (ulong i = 0; i < 4; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(2 + (int)(((va >> 12) + i) % 2)), $"page {i} interleaved on the new nodes");
        Assert.That(cs.SetMems(NodeMask.Of(1, 2, 3)), Is.EqualTo(Errno.None));
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(2)), "node 3, second of {2,3}, becomes the second of {1,2,3}");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Static_nodes_keep_the_users_nodes_that_are_still_allowed()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(0, 1));
        VmProcess p = machine.CreateProcess();
        cs.Attach(p);
        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1, 2), MempolicyFlags.StaticNodes), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(1));
        Assert.That(cs.SetMems(NodeMask.Of(2, 3)), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(2), "node 2 of the user's mask is now allowed");
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(1, 2)), "get_mempolicy reports the user's nodes");
        Assert.That(cs.SetMems(NodeMask.Of(3)), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(3), "none of the user's nodes left: the whole mems");
        Assert.That(cs.SetMems(NodeMask.Of(0, 1, 2, 3)), Is.EqualTo(Errno.None));
        ulong va = p.Mmap(4 * Page);
        p.Fill(va, 4 * Page, 1);
        for (ulong i = 0; i < 4; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.AnyOf(1, 2), "back to the user's nodes once they are allowed again");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Relative_nodes_are_ranks_in_the_mems()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(1, 3));
        VmProcess p = machine.CreateProcess();
        cs.Attach(p);
        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.RelativeNodes), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(3), "relative node 1 is the second node of {1,3}");
        Assert.That(cs.SetMems(NodeMask.Of(0, 2)), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(2), "and then the second node of {0,2}");
        Assert.That(cs.SetMems(NodeMask.Of(2)), Is.EqualTo(Errno.None));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(2), "relative node 1 folds onto a one-node mems");
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(1)), "get_mempolicy reports the user's nodes");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_preferred_node_left_outside_the_mems_falls_back_inside_them()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(0, 1));
        VmProcess p = machine.CreateProcess(homeNode: 0);
        cs.Attach(p);
        p.SetMempolicy(MempolicyMode.Preferred, NodeMask.Of(1));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(1));
        Assert.That(cs.SetMems(NodeMask.Of(2, 3)), Is.EqualTo(Errno.None));
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(1)), "mpol_rebind_preferred keeps the node");
        Assert.That(NodeOfNewPage(p), Is.AnyOf(2, 3), "the cpuset still rules");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Attaching_to_another_cpuset_rebinds_the_policies()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Cpuset a = machine.CreateCpuset("a", NodeMask.Of(0, 1));
        Cpuset b = machine.CreateCpuset("b", NodeMask.Of(2, 3));
        VmProcess p = machine.CreateProcess();
        a.Attach(p);
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(0));
        b.MemoryMigrate = true;
        Assert.That(b.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(b.MemoryMigrate, Is.True);
        Assert.That((a.Processes.Count, b.Processes.Count), Is.EqualTo((0, 1)));
        Assert.That(PolicyNodes(p), Is.EqualTo(NodeMask.Of(2)));
        Assert.That(NodeOfNewPage(p), Is.EqualTo(2));
        Assert.That(b.Attach(p), Is.EqualTo(Errno.None), "attaching where it is does nothing");
        Assert.That(machine.RootCpuset.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(p.GetMempolicy(out _, out NodeMask mems, 0, GetMempolicyFlags.MemsAllowed), Is.EqualTo(Errno.None));
        Assert.That(mems, Is.EqualTo(NodeMask.Of(0, 1, 2, 3)));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_process_of_another_machine_cannot_be_attached()
    {
        using Machine machine = TestMachines.Create();
        using Machine other = TestMachines.Create();
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(0));
        Assert.Throws<ArgumentException>(() => cs.Attach(other.CreateProcess()));
        Assert.Throws<ArgumentException>(() => other.CreateCpuset("c", NodeMask.Of(0), cs));
    }

    [Test]
    [Category("Stress")]
    public void Faults_racing_with_mems_changes_mbind_and_fork_stay_inside_the_nodes_ever_allowed()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes with { NodeSizeBytes = 8L << 20 });
        Cpuset cs = machine.CreateCpuset("race", NodeMask.Of(0, 1));
        VmProcess p = machine.CreateProcess(homeNode: 3);
        Assert.That(cs.Attach(p), Is.EqualTo(Errno.None));
        const int pages = 256;
        ulong va = p.Mmap(pages * Page);
        Assert.That(p.SetMempolicy(MempolicyMode.Interleave, NodeMask.Of(0, 1)), Is.EqualTo(Errno.None));
        int rounds = 40 * TestEnvironment.StressScale;
        NodeMask[] choices = [NodeMask.Of(0, 1), NodeMask.Of(1, 2), NodeMask.Of(0, 2), NodeMask.Of(1)];
        using var done = new CancellationTokenSource();
        var writers = Enumerable.Range(0, 2).Select(w => Task.Run(() =>
        {
            for (int r = 0; !done.IsCancellationRequested; r++)
            {
                for (ulong i = (ulong)w; i < pages; i += 2)
                    p.Write<long>(va + i * Page, r);
                Assert.That(p.Madvise(va + (ulong)w * Page, Page, Advice.DontNeed), Is.EqualTo(Errno.None));
            }
        })).ToArray();
        for (int round = 0; round < rounds; round++)
        {
            Assert.That(cs.SetMems(choices[round % choices.Length]), Is.EqualTo(Errno.None));
            Errno bound = p.Mbind(va + (ulong)(round % 8) * 16 * Page, 16 * Page, MempolicyMode.Bind, NodeMask.Of(round % 3));
            Assert.That(bound, Is.AnyOf(Errno.None, Errno.EINVAL), "EINVAL when the node is outside the mems of the moment");
            VmProcess child = p.Fork();
            child.Write<long>(va, round);
            child.Exit();
        }
        done.Cancel();
        Task.WaitAll(writers);
        for (ulong i = 0; i < pages; i++)
        {
            PagemapEntry entry = p.GetPagemap(va + i * Page);
            if (entry.Present && !entry.ZeroPage)
                Assert.That(entry.Node, Is.AnyOf(0, 1, 2), $"page {i}: never on node 3, the home node no mems ever allowed");
        }
        TestMachines.AssertAuditClean(machine);
    }
}
