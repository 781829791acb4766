using Vmm.Mm;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// Memory policies (Migration/Mempolicy.cs, Mm/AddressSpace.Mempolicy.cs): set_mempolicy,
/// get_mempolicy and mbind with Linux's errors, where each mode puts a faulted page, and how VMA
/// policies follow splits, merges and fork.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class MempolicyTests
{
    private const ulong Page = 4096;

    private static int VmaCount(VmProcess p)
    {
        p.Mm.MmapLock.EnterReadLock();
        try
        {
            return p.Mm.Vmas.Count;
        }
        finally
        {
            p.Mm.MmapLock.ExitReadLock();
        }
    }

    private static (int Mode, NodeMask Nodes) PolicyAt(VmProcess p, ulong va)
    {
        Assert.That(p.GetMempolicy(out int mode, out NodeMask nodes, va, GetMempolicyFlags.Address), Is.EqualTo(Errno.None));
        return (mode, nodes);
    }

    // ============================================================================================
    // set_mempolicy
    // ============================================================================================

    private static readonly object[] SetCases =
    [
        new object[] { (MempolicyMode)7, NodeMask.Of(0), MempolicyFlags.None, Errno.EINVAL },
        new object[] { (MempolicyMode)(-1), NodeMask.Of(0), MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(0), MempolicyFlags.StaticNodes | MempolicyFlags.RelativeNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(0), (MempolicyFlags)1, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(0), (MempolicyFlags)(1 << 13), Errno.EINVAL },
        new object[] { MempolicyMode.Default, NodeMask.Of(0), MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Default, NodeMask.Empty, MempolicyFlags.None, Errno.None },
        new object[] { MempolicyMode.Local, NodeMask.Of(0), MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Local, NodeMask.Empty, MempolicyFlags.StaticNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Local, NodeMask.Empty, MempolicyFlags.RelativeNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Local, NodeMask.Empty, MempolicyFlags.None, Errno.None },
        new object[] { MempolicyMode.Preferred, NodeMask.Empty, MempolicyFlags.None, Errno.None },
        new object[] { MempolicyMode.Preferred, NodeMask.Empty, MempolicyFlags.StaticNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Preferred, NodeMask.Empty, MempolicyFlags.RelativeNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Preferred, NodeMask.Of(1), MempolicyFlags.StaticNodes, Errno.None },
        new object[] { MempolicyMode.Bind, NodeMask.Empty, MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Interleave, NodeMask.Empty, MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.WeightedInterleave, NodeMask.Empty, MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.PreferredMany, NodeMask.Empty, MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(5), MempolicyFlags.None, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(5), MempolicyFlags.StaticNodes, Errno.EINVAL },
        new object[] { MempolicyMode.Bind, NodeMask.Of(5), MempolicyFlags.RelativeNodes, Errno.None },
        new object[] { MempolicyMode.Bind, NodeMask.Of(0, 5), MempolicyFlags.None, Errno.None },
        new object[] { MempolicyMode.Interleave, NodeMask.Of(0, 1), MempolicyFlags.StaticNodes, Errno.None },
        new object[] { MempolicyMode.WeightedInterleave, NodeMask.Of(1), MempolicyFlags.RelativeNodes, Errno.None },
        new object[] { MempolicyMode.PreferredMany, NodeMask.Of(0, 1), MempolicyFlags.None, Errno.None },
    ];

    [TestCaseSource(nameof(SetCases))]
    public void Set_mempolicy_checks_mode_flags_and_nodes_as_Linux(MempolicyMode mode, NodeMask nodes, MempolicyFlags flags, Errno expected)
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        Assert.That(p.SetMempolicy(mode, nodes, flags), Is.EqualTo(expected), $"set_mempolicy({mode}, {{{nodes}}}, {flags})");
    }

    [Test]
    public void A_failed_set_mempolicy_keeps_the_policy_that_was_there()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        Assert.That(p.SetMempolicy(MempolicyMode.Interleave, NodeMask.Empty), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.GetMempolicy(out int mode, out NodeMask nodes), Is.EqualTo(Errno.None));
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(1))), "the bind policy survives the bad call");
    }

    [Test]
    public void Get_mempolicy_reports_the_mode_with_its_flags_and_the_users_nodes_for_static_and_relative_policies()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        Assert.That(p.GetMempolicy(out int mode, out NodeMask nodes), Is.EqualTo(Errno.None));
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Default, NodeMask.Empty)), "a new process has the default policy");

        Assert.That(p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1, 5), MempolicyFlags.StaticNodes), Is.EqualTo(Errno.None));
        p.GetMempolicy(out mode, out nodes);
        Assert.That(mode, Is.EqualTo((int)MempolicyMode.Bind | (int)MempolicyFlags.StaticNodes), "mode | MPOL_F_STATIC_NODES");
        Assert.That(nodes, Is.EqualTo(NodeMask.Of(1, 5)), "STATIC_NODES reports the user's mask, nodes the machine lacks included");

        Assert.That(p.SetMempolicy(MempolicyMode.Interleave, NodeMask.Of(0, 1, 7)), Is.EqualTo(Errno.None));
        p.GetMempolicy(out mode, out nodes);
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Interleave, NodeMask.Of(0, 1))), "without flags: the nodes in effect");

        Assert.That(p.SetMempolicy(MempolicyMode.Preferred, NodeMask.Empty), Is.EqualTo(Errno.None));
        p.GetMempolicy(out mode, out nodes);
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Local, NodeMask.Empty)), "PREFERRED with no node is LOCAL");

        Assert.That(p.SetMempolicy(MempolicyMode.Preferred, NodeMask.Of(0, 1)), Is.EqualTo(Errno.None));
        p.GetMempolicy(out mode, out nodes);
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Preferred, NodeMask.Of(0))), "PREFERRED keeps the first node");

        Assert.That(p.SetMempolicy(MempolicyMode.Default, NodeMask.Empty), Is.EqualTo(Errno.None));
        p.GetMempolicy(out mode, out nodes);
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Default, NodeMask.Empty)), "DEFAULT removes the policy");
    }

    // ============================================================================================
    // get_mempolicy's flags
    // ============================================================================================

    [Test]
    public void Get_mempolicy_refuses_flag_combinations_Linux_refuses()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        Assert.That(p.GetMempolicy(out _, out _, 0, (GetMempolicyFlags)8), Is.EqualTo(Errno.EINVAL), "unknown flag");
        Assert.That(p.GetMempolicy(out _, out _, 0, GetMempolicyFlags.MemsAllowed | GetMempolicyFlags.Node), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.GetMempolicy(out _, out _, va, GetMempolicyFlags.MemsAllowed | GetMempolicyFlags.Address), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.GetMempolicy(out _, out _, va), Is.EqualTo(Errno.EINVAL), "an address without MPOL_F_ADDR");
        Assert.That(p.GetMempolicy(out _, out _, 0, GetMempolicyFlags.Node), Is.EqualTo(Errno.EINVAL), "MPOL_F_NODE alone needs an interleave task policy");
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1));
        Assert.That(p.GetMempolicy(out _, out _, 0, GetMempolicyFlags.Node), Is.EqualTo(Errno.EINVAL), "bind has no next node");
        Assert.That(p.GetMempolicy(out _, out _, va + (1 << 20), GetMempolicyFlags.Address), Is.EqualTo(Errno.EFAULT), "no VMA there");
        Assert.That(p.GetMempolicy(out _, out _, va + (1 << 20), GetMempolicyFlags.Address | GetMempolicyFlags.Node), Is.EqualTo(Errno.EFAULT));
    }

    [Test]
    public void Mems_allowed_alone_reports_the_cpusets_nodes()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.GetMempolicy(out int mode, out NodeMask nodes, 0, GetMempolicyFlags.MemsAllowed), Is.EqualTo(Errno.None));
        Assert.That((mode, nodes), Is.EqualTo((0, NodeMask.Of(0, 1, 2, 3))), "the root cpuset allows every node");
        Cpuset cs = machine.CreateCpuset("job", NodeMask.Of(1, 3));
        Assert.That(cs.Attach(p), Is.EqualTo(Errno.None));
        p.GetMempolicy(out _, out nodes, 0, GetMempolicyFlags.MemsAllowed);
        Assert.That(nodes, Is.EqualTo(NodeMask.Of(1, 3)));
    }

    [Test]
    public void Node_alone_names_the_next_node_of_an_interleave_task_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        p.SetMempolicy(MempolicyMode.Interleave, NodeMask.Of(2, 3));
        Assert.That(p.GetMempolicy(out int node, out NodeMask nodes, 0, GetMempolicyFlags.Node), Is.EqualTo(Errno.None));
        Assert.That((node, nodes), Is.EqualTo((2, NodeMask.Of(2, 3))), "after a set, the interleave starts at the first node");
        p.SetMempolicy(MempolicyMode.WeightedInterleave, NodeMask.Of(1, 3));
        p.GetMempolicy(out node, out _, 0, GetMempolicyFlags.Node);
        Assert.That(node, Is.EqualTo(1));
    }

    [Test]
    public void Address_reports_the_vmas_own_policy_and_default_where_it_has_none()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * Page);
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1));
        Assert.That(PolicyAt(p, va), Is.EqualTo(((int)MempolicyMode.Default, NodeMask.Empty)), "the task policy is not the VMA's");
        Assert.That(p.Mbind(va + Page, Page, MempolicyMode.Interleave, NodeMask.Of(0, 1)), Is.EqualTo(Errno.None));
        Assert.That(PolicyAt(p, va + Page), Is.EqualTo(((int)MempolicyMode.Interleave, NodeMask.Of(0, 1))));
        Assert.That(PolicyAt(p, va + Page + 123), Is.EqualTo(((int)MempolicyMode.Interleave, NodeMask.Of(0, 1))), "any address inside the page");
    }

    [Test]
    public void Node_with_address_faults_the_page_in_and_names_its_node()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(3 * Page);
        Assert.That(p.Mbind(va + Page, Page, MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        p.Write<long>(va + Page, 1);
        Assert.That(p.GetMempolicy(out int node, out NodeMask nodes, va + Page + 8, GetMempolicyFlags.Node | GetMempolicyFlags.Address), Is.EqualTo(Errno.None));
        Assert.That((node, nodes), Is.EqualTo((1, NodeMask.Of(1))), "the node of the page, and the VMA policy's nodes");

        Assert.That(p.GetPagemap(va).Present, Is.False);
        Assert.That(p.GetMempolicy(out node, out _, va, GetMempolicyFlags.Node | GetMempolicyFlags.Address), Is.EqualTo(Errno.None));
        PagemapEntry entry = p.GetPagemap(va);
        Assert.That(entry.Present && entry.ZeroPage, Is.True, "a read fault mapped the zero page, as get_user_pages does");
        Assert.That(node, Is.EqualTo(machine.Topology.NodeOf(entry.Pfn)), "the zero page's node");

        Assert.That(p.Mprotect(va + 2 * Page, Page, Protection.None), Is.EqualTo(Errno.None));
        Assert.That(p.GetMempolicy(out _, out _, va + 2 * Page, GetMempolicyFlags.Node | GetMempolicyFlags.Address), Is.EqualTo(Errno.EFAULT), "PROT_NONE cannot be read");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Node_with_address_is_ENOMEM_when_the_fault_finds_no_frame()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong big = p.Mmap(16UL << 20);
        Assert.Throws<InsufficientMemoryException>(() => p.Fill(big, 16UL << 20, 1), "fill the machine");
        // A mapping far from the filled one needs new page tables, for which no frame is left.
        Assert.That(p.Mmap(1UL << 40, Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out ulong far), Is.EqualTo(Errno.None));
        Assert.That(p.GetMempolicy(out _, out _, far, GetMempolicyFlags.Node | GetMempolicyFlags.Address), Is.EqualTo(Errno.ENOMEM));
        p.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    // ============================================================================================
    // mbind's errors
    // ============================================================================================

    [Test]
    public void Mbind_checks_its_arguments_in_Linuxs_order()
    {
        using Machine machine = TestMachines.Create();
        VmProcess root = machine.CreateProcess();
        VmProcess user = machine.CreateProcess(Credentials.User(1000));
        ulong va = root.Mmap(4 * Page);
        ulong userVa = user.Mmap(4 * Page);
        NodeMask one = NodeMask.Of(1);
        Assert.That(root.Mbind(va, Page, (MempolicyMode)9, one), Is.EqualTo(Errno.EINVAL), "unknown mode");
        Assert.That(root.Mbind(va, Page, MempolicyMode.Bind, one, MempolicyFlags.StaticNodes | MempolicyFlags.RelativeNodes), Is.EqualTo(Errno.EINVAL));
        Assert.That(root.Mbind(va, Page, MempolicyMode.Bind, one, MempolicyFlags.None, (MovePolicyFlags)8), Is.EqualTo(Errno.EINVAL), "unknown MPOL_MF flag");
        Assert.That(user.Mbind(userVa + 1, Page, MempolicyMode.Bind, one, MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.EPERM),
            "MOVE_ALL without CAP_SYS_NICE is EPERM, before the address is looked at");
        Assert.That(root.Mbind(va + 1, Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EINVAL), "misaligned start");
        Assert.That(root.Mbind(va, 0, MempolicyMode.Bind, NodeMask.Empty), Is.EqualTo(Errno.None), "an empty range is done before the policy is checked");
        Assert.That(root.Mbind(va, unchecked(0UL - va + Page), MempolicyMode.Bind, one), Is.EqualTo(Errno.EINVAL), "a range that wraps");
        Assert.That(root.Mbind(va, ulong.MaxValue, MempolicyMode.Bind, NodeMask.Empty), Is.EqualTo(Errno.None), "PAGE_ALIGN wraps the length to 0: done, as Linux");
        Assert.That(root.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Empty), Is.EqualTo(Errno.EINVAL), "bind with no node");
        Assert.That(root.Mbind(va, Page, MempolicyMode.Default, one), Is.EqualTo(Errno.EINVAL), "default with nodes");
        Assert.That(root.Mbind(va, Page, MempolicyMode.Local, one), Is.EqualTo(Errno.EINVAL), "local with nodes");
        Assert.That(root.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Of(9)), Is.EqualTo(Errno.EINVAL), "no node of the machine");
        Assert.That(PolicyAt(root, va).Mode, Is.EqualTo((int)MempolicyMode.Default), "nothing was applied by the failed calls");
    }

    [Test]
    public void Mbind_over_a_hole_is_EFAULT_and_changes_nothing()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(5 * Page);
        Assert.That(p.Munmap(va + 2 * Page, Page), Is.EqualTo(Errno.None)); // [0,2) hole [3,5)
        NodeMask one = NodeMask.Of(1);
        Assert.That(p.Mbind(va, 5 * Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EFAULT), "a hole in the middle");
        Assert.That(p.Mbind(va + 2 * Page, 3 * Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EFAULT), "a hole at the head");
        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EFAULT), "a hole at the tail");
        Assert.That(p.Mbind(va + 2 * Page, Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EFAULT), "all hole");
        Assert.That(p.Mbind(va + 5 * Page, Page, MempolicyMode.Bind, one), Is.EqualTo(Errno.EFAULT), "beyond every mapping");
        Assert.That(VmaCount(p), Is.EqualTo(2), "no VMA was split by a failed mbind");
        Assert.That(PolicyAt(p, va).Mode, Is.EqualTo((int)MempolicyMode.Default));
        Assert.That(PolicyAt(p, va + 4 * Page).Mode, Is.EqualTo((int)MempolicyMode.Default));
    }

    [Test]
    public void Mbind_default_accepts_holes_but_not_a_range_with_no_mapping()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(5 * Page);
        Assert.That(p.Mbind(va, 5 * Page, MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        p.Munmap(va + 2 * Page, Page);
        Assert.That(p.Mbind(va, 5 * Page, MempolicyMode.Default, NodeMask.Empty), Is.EqualTo(Errno.None), "MPOL_MF_DISCONTIG_OK");
        Assert.That(PolicyAt(p, va).Mode, Is.EqualTo((int)MempolicyMode.Default));
        Assert.That(PolicyAt(p, va + 4 * Page).Mode, Is.EqualTo((int)MempolicyMode.Default));
        Assert.That(p.Mbind(va + 2 * Page, Page, MempolicyMode.Default, NodeMask.Empty), Is.EqualTo(Errno.EFAULT), "no VMA at all in the range");
    }

    [Test]
    public void Strict_is_EIO_when_a_page_already_lies_outside_the_nodes_and_then_applies_nothing()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(3 * Page);
        p.Write<long>(va + Page, 5); // on node 0
        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.Strict), Is.EqualTo(Errno.EIO));
        Assert.That(PolicyAt(p, va).Mode, Is.EqualTo((int)MempolicyMode.Default), "Linux 6.7+: the walk's EIO comes before mbind_range");
        Assert.That(VmaCount(p), Is.EqualTo(1));

        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Bind, NodeMask.Of(0), MempolicyFlags.None, MovePolicyFlags.Strict), Is.EqualTo(Errno.None), "the page complies");
        Assert.That(PolicyAt(p, va), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(0))));
        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Default, NodeMask.Empty, MempolicyFlags.None, MovePolicyFlags.Strict), Is.EqualTo(Errno.None), "STRICT is dropped for DEFAULT");
        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None), "without STRICT a misplaced page is fine");
        Assert.That(p.Read<long>(va + Page), Is.EqualTo(5));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Strict_and_move_walk_ranges_without_page_tables()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(8UL << 20); // never touched: no page table below it
        p.Write<int>(va + (6UL << 20), 1); // one table, far into the range
        Assert.That(p.Mbind(va, 8UL << 20, MempolicyMode.Bind, NodeMask.Of(0), MempolicyFlags.None, MovePolicyFlags.Strict), Is.EqualTo(Errno.None));
        Assert.That(p.Mbind(va, 8UL << 20, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.Move | MovePolicyFlags.Strict), Is.EqualTo(Errno.None));
        Assert.That(NodeOf(p, va + (6UL << 20)), Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Strict_ignores_the_zero_page()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(2 * Page);
        _ = p.Read<long>(va); // the zero page
        int zeroNode = NodeOf(p, va);
        Assert.That(p.Mbind(va, 2 * Page, MempolicyMode.Bind, NodeMask.Of(1 - zeroNode), MempolicyFlags.None, MovePolicyFlags.Strict), Is.EqualTo(Errno.None),
            "vm_normal_folio skips the zero page");
    }

    // ============================================================================================
    // Placement
    // ============================================================================================

    [TestCase(MempolicyMode.Default, "", 1)]
    [TestCase(MempolicyMode.Local, "", 1)]
    [TestCase(MempolicyMode.Preferred, "2", 2)]
    [TestCase(MempolicyMode.PreferredMany, "3", 3)]
    [TestCase(MempolicyMode.Bind, "0", 0)]
    public void A_task_policy_places_anonymous_faults(MempolicyMode mode, string nodes, int expected)
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 1);
        Assert.That(NodeMask.TryParse(nodes, out NodeMask mask), Is.True);
        Assert.That(p.SetMempolicy(mode, mask), Is.EqualTo(Errno.None));
        ulong va = p.Mmap(8 * Page);
        p.Fill(va, 8 * Page, 3);
        for (ulong i = 0; i < 8; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(expected), $"page {i} under {mode} {{{nodes}}} from home node 1");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Bind_to_several_nodes_starts_at_the_nearest_to_the_home_node()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 2);
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(0, 2));
        ulong va = p.Mmap(Page);
        p.Write<int>(va, 1);
        Assert.That(NodeOf(p, va), Is.EqualTo(2), "the home node is in the mask");
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1, 3));
        ulong vb = p.Mmap(Page);
        p.Write<int>(vb, 1);
        Assert.That(NodeOf(p, vb), Is.AnyOf(1, 3), "outside the mask never");
    }

    [Test]
    public void Interleave_follows_the_page_offset_not_the_order_of_faults()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(16 * Page);
        Assert.That(p.Mbind(va, 16 * Page, MempolicyMode.Interleave, NodeMask.Of(1, 2, 3)), Is.EqualTo(Errno.None));
        int[] nodes = [1, 2, 3];
        for (int i = 15; i >= 0; i--) // backwards: a round-robin counter would give other nodes
            p.Write<int>(va + (ulong)i * Page, i);
        for (ulong i = 0; i < 16; i++)
        {
            ulong pgoff = (va >> 12) + i; // an anonymous VMA's vm_pgoff is its start >> 12
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(nodes[(int)(pgoff % 3)]), $"page {i}");
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Interleave_placement_survives_a_vma_split()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(12 * Page);
        p.SetMempolicy(MempolicyMode.Interleave, NodeMask.Of(0, 1, 2, 3));
        Assert.That(p.Mprotect(va + 5 * Page, 2 * Page, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(VmaCount(p), Is.EqualTo(3));
        Assert.That(p.Mprotect(va + 5 * Page, 2 * Page, Protection.ReadWrite), Is.EqualTo(Errno.None));
        // Split again by an mbind with the same interleave on the middle part: a different object, equal
        // policy, so the VMA part gets its own policy and then the offset still decides.
        Assert.That(p.Mbind(va + 3 * Page, 4 * Page, MempolicyMode.Interleave, NodeMask.Of(0, 1, 2, 3)), Is.EqualTo(Errno.None));
        p.Fill(va, 12 * Page, 9);
        for (ulong i = 0; i < 12; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo((int)(((va >> 12) + i) % 4)), $"page {i}");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Weighted_interleave_puts_pages_in_the_ratio_of_the_weights()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        Assert.That(machine.GetInterleaveWeight(0), Is.EqualTo(1), "the default weight");
        Assert.That(machine.SetInterleaveWeight(0, 3), Is.EqualTo(Errno.None));
        Assert.That(machine.SetInterleaveWeight(2, 1), Is.EqualTo(Errno.None));
        Assert.That(machine.SetInterleaveWeight(3, 4), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        const int pages = 64;
        ulong va = p.Mmap(pages * Page);
        Assert.That(p.Mbind(va, pages * Page, MempolicyMode.WeightedInterleave, NodeMask.Of(0, 2, 3)), Is.EqualTo(Errno.None));
        p.Fill(va, pages * Page, 1);
        int[] cycle = [0, 0, 0, 2, 3, 3, 3, 3]; // weights 3, 1, 4: eight pages a round
        var counts = new int[4];
        for (ulong i = 0; i < pages; i++)
        {
            int node = NodeOf(p, va + i * Page);
            counts[node]++;
            Assert.That(node, Is.EqualTo(cycle[(int)(((va >> 12) + i) % 8)]), $"page {i}");
        }
        Assert.That((counts[0], counts[1], counts[2], counts[3]), Is.EqualTo((24, 0, 8, 32)), "3 : 1 : 4");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Interleave_weights_accept_1_to_255_only()
    {
        using Machine machine = TestMachines.Create();
        Assert.That(machine.SetInterleaveWeight(1, 0), Is.EqualTo(Errno.EINVAL));
        Assert.That(machine.SetInterleaveWeight(1, 256), Is.EqualTo(Errno.EINVAL));
        Assert.That(machine.SetInterleaveWeight(1, 255), Is.EqualTo(Errno.None));
        Assert.That(machine.GetInterleaveWeight(1), Is.EqualTo(255));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.SetInterleaveWeight(2, 1), "no node 2: no sysfs file");
    }

    [Test]
    public void Bind_never_falls_back_while_preferred_and_preferred_many_do()
    {
        using Machine machine = TestMachines.Create();
        VmProcess bound = machine.CreateProcess(homeNode: 0);
        bound.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1));
        ulong size = 8UL << 20;
        ulong va = bound.Mmap(size);
        var e = Assert.Throws<InsufficientMemoryException>(() => bound.Fill(va, size, 7), "node 1 runs out");
        ulong failedAt = (ulong)e!.Data[VmProcess.FaultAddressKey]!;
        long node0Free = machine.GetStats().Nodes[0].Zones.Sum(z => z.FreePages);
        Assert.That(node0Free, Is.GreaterThan(256), "node 0 still had room: bind did not use it");
        for (ulong a = va; a < failedAt; a += Page)
            Assert.That(NodeOf(bound, a), Is.EqualTo(1));

        VmProcess preferred = machine.CreateProcess(homeNode: 0);
        preferred.SetMempolicy(MempolicyMode.Preferred, NodeMask.Of(1));
        ulong vp = preferred.Mmap(Page);
        preferred.Write<int>(vp, 1);
        Assert.That(NodeOf(preferred, vp), Is.Zero, "preferred falls back");
        VmProcess many = machine.CreateProcess(homeNode: 0);
        many.SetMempolicy(MempolicyMode.PreferredMany, NodeMask.Of(1));
        ulong vm = many.Mmap(Page);
        many.Write<int>(vm, 1);
        Assert.That(NodeOf(many, vm), Is.Zero, "preferred-many falls back");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Preferred_many_uses_its_nodes_first_and_the_cpuset_in_the_fallback()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess filler = machine.CreateProcess(homeNode: 2);
        filler.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(2));
        ulong big = filler.Mmap(8UL << 20);
        Assert.Throws<InsufficientMemoryException>(() => filler.Fill(big, 8UL << 20, 1), "node 2 is now full");

        VmProcess p = machine.CreateProcess(homeNode: 0);
        Cpuset cs = machine.CreateCpuset("c", NodeMask.Of(0, 2, 3));
        cs.Attach(p);
        p.SetMempolicy(MempolicyMode.PreferredMany, NodeMask.Of(2, 3));
        ulong va = p.Mmap(4 * Page);
        p.Fill(va, 4 * Page, 1);
        for (ulong i = 0; i < 4; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(3), "node 2 is full: the other preferred node, not the home node");
        filler.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_vma_policy_wins_over_the_task_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess();
        p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(3));
        ulong va = p.Mmap(2 * Page);
        p.Mbind(va + Page, Page, MempolicyMode.Preferred, NodeMask.Of(2));
        p.Fill(va, 2 * Page, 1);
        Assert.That((NodeOf(p, va), NodeOf(p, va + Page)), Is.EqualTo((3, 2)));
    }

    [Test]
    public void Copy_on_write_and_shared_memory_faults_follow_the_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        ulong va = parent.Mmap(Page);
        parent.Write<long>(va, 11);
        Assert.That(NodeOf(parent, va), Is.Zero);
        VmProcess child = parent.Fork();
        Assert.That(child.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(2)), Is.EqualTo(Errno.None));
        child.Write<long>(va, 12);
        Assert.That(NodeOf(child, va), Is.EqualTo(2), "the copy of a copy-on-write fault is allocated by the policy");
        Assert.That(parent.Read<long>(va), Is.EqualTo(11));

        Assert.That(parent.Mmap(0, 8 * Page, Protection.ReadWrite, MapFlags.Shared, out ulong shared), Is.EqualTo(Errno.None));
        Assert.That(parent.Mbind(shared, 4 * Page, MempolicyMode.Bind, NodeMask.Of(3)), Is.EqualTo(Errno.None));
        Assert.That(parent.Mbind(shared + 4 * Page, 4 * Page, MempolicyMode.Interleave, NodeMask.Of(1, 2)), Is.EqualTo(Errno.None));
        parent.Fill(shared, 8 * Page, 5);
        for (ulong i = 0; i < 4; i++)
            Assert.That(NodeOf(parent, shared + i * Page), Is.EqualTo(3), $"shared page {i}: bind");
        int first = NodeOf(parent, shared + 4 * Page);
        for (ulong i = 4; i < 8; i++)
            Assert.That(NodeOf(parent, shared + i * Page), Is.EqualTo((i % 2 == 0) == (first == 1) ? 1 : 2), $"shared page {i}: interleaved by index");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_unshare_copy_for_a_read_pin_follows_the_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        ulong va = parent.Mmap(Page);
        parent.Write<long>(va, 3);
        VmProcess child = parent.Fork();
        child.SetMempolicy(MempolicyMode.Preferred, NodeMask.Of(3));
        using (PinnedMemory pin = child.Pin(va, Page, write: false))
            Assert.That(NodeOf(child, va), Is.EqualTo(3), "FAULT_FLAG_UNSHARE copied the page where the policy says");
        Assert.That(child.Read<long>(va), Is.EqualTo(3));
        TestMachines.AssertAuditClean(machine);
    }

    // ============================================================================================
    // Split, merge, fork
    // ============================================================================================

    [Test]
    public void Mbind_splits_a_vma_and_equal_neighbours_merge_again()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 * Page);
        Assert.That(p.Mbind(va + Page, Page, MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        Assert.That(VmaCount(p), Is.EqualTo(3));
        Assert.That(PolicyAt(p, va).Mode, Is.EqualTo((int)MempolicyMode.Default));
        Assert.That(PolicyAt(p, va + Page), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(1))));
        Assert.That(PolicyAt(p, va + 2 * Page).Mode, Is.EqualTo((int)MempolicyMode.Default));

        Assert.That(p.Mbind(va + 2 * Page, Page, MempolicyMode.Bind, NodeMask.Of(1)), Is.EqualTo(Errno.None));
        Assert.That(VmaCount(p), Is.EqualTo(2), "an equal policy (another object) merges with its neighbour");
        Assert.That(p.Mprotect(va, 3 * Page, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(VmaCount(p), Is.EqualTo(2), "mprotect does not merge VMAs whose policies differ");
        Assert.That(p.Mbind(va, 3 * Page, MempolicyMode.Default, NodeMask.Empty), Is.EqualTo(Errno.None));
        Assert.That(VmaCount(p), Is.EqualTo(1), "all default again: one VMA");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Policies_with_different_flags_do_not_merge()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * Page);
        p.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.StaticNodes);
        p.Mbind(va + Page, Page, MempolicyMode.Bind, NodeMask.Of(1));
        Assert.That(VmaCount(p), Is.EqualTo(2), "mpol_equal compares the flags");
        p.Mbind(va + Page, Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.StaticNodes);
        Assert.That(VmaCount(p), Is.EqualTo(1));
    }

    [Test]
    public void Munmap_of_part_of_a_bound_vma_keeps_the_rest_bound()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(4 * Page);
        p.Mbind(va, 4 * Page, MempolicyMode.Bind, NodeMask.Of(1));
        p.Munmap(va + Page, Page);
        p.Fill(va + 2 * Page, 2 * Page, 1);
        Assert.That(PolicyAt(p, va + 3 * Page), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(1))));
        Assert.That(NodeOf(p, va + 3 * Page), Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Fork_inherits_the_task_policy_and_every_vma_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        parent.SetMempolicy(MempolicyMode.Interleave, NodeMask.Of(2, 3), MempolicyFlags.StaticNodes);
        ulong va = parent.Mmap(4 * Page);
        parent.Mbind(va + 2 * Page, 2 * Page, MempolicyMode.Bind, NodeMask.Of(1));
        VmProcess child = parent.Fork();
        Assert.That(child.GetMempolicy(out int mode, out NodeMask nodes), Is.EqualTo(Errno.None));
        Assert.That((mode, nodes), Is.EqualTo(((int)MempolicyMode.Interleave | (int)MempolicyFlags.StaticNodes, NodeMask.Of(2, 3))));
        Assert.That(PolicyAt(child, va + 3 * Page), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(1))));
        Assert.That(VmaCount(child), Is.EqualTo(2));
        child.Fill(va, 4 * Page, 4);
        Assert.That(NodeOf(child, va + 3 * Page), Is.EqualTo(1));
        Assert.That(NodeOf(child, va), Is.AnyOf(2, 3));
        Assert.That(NodeOf(child, va + Page), Is.AnyOf(2, 3).And.Not.EqualTo(NodeOf(child, va)), "interleaved");
        Assert.That(parent.SetMempolicy(MempolicyMode.Default, NodeMask.Empty), Is.EqualTo(Errno.None));
        child.GetMempolicy(out mode, out _);
        Assert.That(mode & 0xff, Is.EqualTo((int)MempolicyMode.Interleave), "the child's copy is its own");
        TestMachines.AssertAuditClean(machine);
    }
    // ============================================================================================
    // MPOL_MF_MOVE / MPOL_MF_MOVE_ALL
    // ============================================================================================

    [Test]
    public void Move_migrates_the_misplaced_pages_to_the_policys_nodes()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(8 * Page);
        for (ulong i = 0; i < 8; i++)
            p.Write<ulong>(va + i * Page, 0xABC0 + i);
        long before = machine.GetMigrationStats().Succeeded;
        Assert.That(p.Mbind(va, 8 * Page, MempolicyMode.Bind, NodeMask.Of(2), MempolicyFlags.None, MovePolicyFlags.Move | MovePolicyFlags.Strict), Is.EqualTo(Errno.None));
        for (ulong i = 0; i < 8; i++)
        {
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(2), $"page {i} moved");
            Assert.That(p.Read<ulong>(va + i * Page), Is.EqualTo(0xABC0 + i), $"page {i} kept its contents");
        }
        MigrationStats stats = machine.GetMigrationStats();
        Assert.That(stats.Succeeded - before, Is.EqualTo(8));
        Assert.That(stats.SucceededByReason[MigrateReason.MempolicyMbind], Is.EqualTo(8), "counted as MR_MEMPOLICY_MBIND");
        Assert.That(PolicyAt(p, va), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(2))));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Move_interleaves_the_moved_pages_by_offset()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(8 * Page);
        p.Fill(va, 8 * Page, 0x11);
        Assert.That(p.Mbind(va, 8 * Page, MempolicyMode.Interleave, NodeMask.Of(1, 3), MempolicyFlags.None, MovePolicyFlags.Move), Is.EqualTo(Errno.None));
        for (ulong i = 0; i < 8; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(((va >> 12) + i) % 2 == 0 ? 1 : 3), $"page {i}");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Move_leaves_pages_other_processes_map_and_move_all_takes_them()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        ulong va = parent.Mmap(2 * Page);
        parent.Fill(va, 2 * Page, 0x22);
        VmProcess child = parent.Fork(); // both pages now shared copy-on-write
        Assert.That(parent.Mbind(va, 2 * Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.Move | MovePolicyFlags.Strict), Is.EqualTo(Errno.None),
            "a shared page skipped by MOVE is not a failure");
        Assert.That(NodeOf(parent, va), Is.Zero);
        Assert.That(parent.Mbind(va, 2 * Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That((NodeOf(parent, va), NodeOf(child, va)), Is.EqualTo((1, 1)), "the page moved for both");
        Assert.That(child.Read<byte>(va + 5), Is.EqualTo(0x22));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Move_of_a_pinned_page_fails_and_strict_makes_that_EIO()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(2 * Page);
        p.Fill(va, 2 * Page, 0x33);
        using (PinnedMemory pin = p.Pin(va, Page, write: true))
        {
            Assert.That(p.Mbind(va, 2 * Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.Move | MovePolicyFlags.Strict), Is.EqualTo(Errno.EIO));
            Assert.That(NodeOf(p, va), Is.Zero, "the pinned page stayed");
            Assert.That(NodeOf(p, va + Page), Is.EqualTo(1), "the other moved");
            Assert.That(PolicyAt(p, va), Is.EqualTo(((int)MempolicyMode.Bind, NodeMask.Of(1))), "with MOVE the policy is applied before the migration");
            Assert.That(p.Mbind(va, 2 * Page, MempolicyMode.Bind, NodeMask.Of(2), MempolicyFlags.None, MovePolicyFlags.Move), Is.EqualTo(Errno.None), "without STRICT the failure is silent");
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Move_all_needs_CAP_SYS_NICE_and_checks_the_current_credentials()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Write<int>(va, 1);
        Assert.That(p.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That(p.Capset(Capabilities.None, Capabilities.None), Is.EqualTo(Errno.None));
        Assert.That(p.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Of(0), MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.EPERM));
        Assert.That(p.Mbind(va, Page, MempolicyMode.Bind, NodeMask.Of(0), MempolicyFlags.None, MovePolicyFlags.Move), Is.EqualTo(Errno.None));
        Assert.That(NodeOf(p, va), Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Move_of_shared_memory_pages_follows_the_policy()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        Assert.That(p.Mmap(0, 4 * Page, Protection.ReadWrite, MapFlags.Shared, out ulong va), Is.EqualTo(Errno.None));
        p.Fill(va, 4 * Page, 0x44);
        Assert.That(p.Mbind(va, 4 * Page, MempolicyMode.Bind, NodeMask.Of(3), MempolicyFlags.None, MovePolicyFlags.Move | MovePolicyFlags.Strict), Is.EqualTo(Errno.None));
        for (ulong i = 0; i < 4; i++)
            Assert.That(NodeOf(p, va + i * Page), Is.EqualTo(3));
        Assert.That(p.Read<byte>(va + 3 * Page + 7), Is.EqualTo(0x44));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Stress")]
    public void Mbind_move_under_running_writers_loses_no_write()
    {
        using Machine machine = TestMachines.Create(TestMachines.FourSmallNodes);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 64;
        ulong va = p.Mmap(pages * Page);
        var last = new long[pages];
        using var done = new CancellationTokenSource();
        Task writer = Task.Run(() =>
        {
            for (long r = 1; !done.IsCancellationRequested; r++)
            {
                for (int i = 0; i < pages; i++)
                {
                    p.Write<long>(va + (ulong)i * Page + 8, r);
                    Volatile.Write(ref last[i], r);
                }
            }
        });
        SpinWait.SpinUntil(() => Volatile.Read(ref last[pages - 1]) >= 2 || writer.IsCompleted, TimeSpan.FromSeconds(10));
        int rounds = 30 * TestEnvironment.StressScale;
        for (int round = 0; round < rounds; round++)
        {
            int node = (round + 1) % 4; // the pages start on node 0: the first round moves them all
            Errno moved = p.Mbind(va, pages * Page, MempolicyMode.Bind, NodeMask.Of(node), MempolicyFlags.None, MovePolicyFlags.Move);
            Assert.That(moved, Is.EqualTo(Errno.None), $"round {round}");
        }
        done.Cancel();
        writer.Wait();
        for (int i = 0; i < pages; i++)
            Assert.That(p.Read<long>(va + (ulong)i * Page + 8), Is.EqualTo(last[i]), $"page {i}: the last write survived every move");
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.MempolicyMbind], Is.GreaterThan(0));
        TestMachines.AssertAuditClean(machine);
    }
}
