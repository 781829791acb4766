using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// The calls and cpusets (Migration/PageMoves.cs, Migration/Cpuset.cs): move_pages to a node outside the
/// target's cpuset is EACCES, migrate_pages checks both cpusets, and memory_migrate moves a cpuset's
/// members' pages when its mems change or a process is attached to it (cpuset_migrate_mm).
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class CpusetMigrationTests
{
    private const int Page = 4096;

    private static (VmProcess Process, ulong Va, byte[] Bytes) Populated(Machine machine, Cpuset cpuset, int pages)
    {
        VmProcess p = machine.CreateProcess(Credentials.User(1000));
        Assert.That(cpuset.Attach(p), Is.EqualTo(Errno.None));
        ulong va = p.Mmap((ulong)(pages * Page));
        return (p, va, WriteRandomPages(p, va, pages, seed: pages));
    }

    private static void AssertBytes(VmProcess p, ulong va, byte[] expected)
    {
        Assert.That(ReadPages(p, va, expected.Length / Page), Is.EqualTo(expected), "every byte moved with its page");
    }

    [Test]
    public void Move_pages_to_a_node_outside_the_targets_cpuset_is_EACCES_and_nothing_moves()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset zero = machine.CreateCpuset("zero", NodeMask.Of(0));
        (VmProcess p, ulong va, _) = Populated(machine, zero, 2);
        var status = new int[] { 99, 99 };
        Assert.That(p.MovePages(0, [va, va + Page], [0, 1], status), Is.EqualTo(Errno.EACCES));
        Assert.That(status, Is.All.EqualTo(99));
        Assert.That(NodesOf(p, va, 2), Is.All.Zero);

        VmProcess root = machine.CreateProcess();
        Assert.That(root.MovePages(p.Pid, [va], [1], status), Is.EqualTo(Errno.EACCES), "the target's cpuset decides, even for root");
        Assert.That(p.MovePages(0, [va], [7], status), Is.EqualTo(Errno.ENODEV), "a node the machine lacks is ENODEV first");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Migrate_pages_checks_the_targets_cpuset_and_then_the_callers()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset zero = machine.CreateCpuset("zero", NodeMask.Of(0));
        (VmProcess p, ulong va, _) = Populated(machine, zero, 2);

        Assert.That(p.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out _), Is.EqualTo(Errno.EPERM),
            "new nodes outside the target's cpuset need CAP_SYS_NICE");
        Assert.That(NodesOf(p, va, 2), Is.All.Zero);

        VmProcess root = machine.CreateProcess();
        Assert.That(root.MigratePages(p.Pid, NodeMask.Of(0), NodeMask.Of(1), out long notMoved), Is.EqualTo(Errno.None), "root may");
        Assert.That(notMoved, Is.Zero);
        Assert.That(NodesOf(p, va, 2), Is.All.EqualTo(1));

        VmProcess confined = machine.CreateProcess();
        Assert.That(zero.Attach(confined), Is.EqualTo(Errno.None));
        Assert.That(confined.MigratePages(p.Pid, NodeMask.Of(1), NodeMask.Of(1), out _), Is.EqualTo(Errno.EINVAL),
            "no new node the caller's own cpuset allows");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Writing_mems_with_memory_migrate_moves_every_members_pages()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset set = machine.CreateCpuset("set", NodeMask.Of(0));
        (VmProcess a, ulong va, byte[] bytesA) = Populated(machine, set, 6);
        (VmProcess b, ulong vb, byte[] bytesB) = Populated(machine, set, 3);
        set.MemoryMigrate = true;

        Assert.That(set.SetMems(NodeMask.Of(1)), Is.EqualTo(Errno.None));

        Assert.That(NodesOf(a, va, 6), Is.All.EqualTo(1));
        Assert.That(NodesOf(b, vb, 3), Is.All.EqualTo(1));
        AssertBytes(a, va, bytesA);
        AssertBytes(b, vb, bytesB);
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.Syscall], Is.EqualTo(9L));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Writing_mems_without_memory_migrate_leaves_the_pages_where_they_are()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset set = machine.CreateCpuset("set", NodeMask.Of(0));
        (VmProcess a, ulong va, byte[] bytes) = Populated(machine, set, 4);
        Assert.That(set.SetMems(NodeMask.Of(1)), Is.EqualTo(Errno.None));
        Assert.That(NodesOf(a, va, 4), Is.All.Zero, "only new allocations follow the mems");
        ulong more = a.Mmap(Page);
        a.Write<int>(more, 1);
        Assert.That(a.GetPagemap(more).Node, Is.EqualTo(1));
        AssertBytes(a, va, bytes);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Growing_mems_with_memory_migrate_moves_nothing_as_do_migrate_pages_keeps_a_node_in_both()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset set = machine.CreateCpuset("set", NodeMask.Of(0));
        (VmProcess a, ulong va, _) = Populated(machine, set, 3);
        set.MemoryMigrate = true;
        Assert.That(set.SetMems(NodeMask.Of(0, 1)), Is.EqualTo(Errno.None));
        Assert.That(NodesOf(a, va, 3), Is.All.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Attaching_to_a_cpuset_with_memory_migrate_moves_the_process_pages()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Cpuset zero = machine.CreateCpuset("zero", NodeMask.Of(0));
        Cpuset one = machine.CreateCpuset("one", NodeMask.Of(1));
        (VmProcess p, ulong va, byte[] bytes) = Populated(machine, zero, 5);
        VmProcess child = p.Fork(); // shares the pages copy-on-write: cpuset moves are MPOL_MF_MOVE_ALL

        Assert.That(one.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(NodesOf(p, va, 5), Is.All.Zero, "without memory_migrate nothing moves");

        Assert.That(zero.Attach(p), Is.EqualTo(Errno.None));
        one.MemoryMigrate = true;
        Assert.That(one.Attach(p), Is.EqualTo(Errno.None));
        Assert.That(NodesOf(p, va, 5), Is.All.EqualTo(1));
        Assert.That(NodesOf(child, va, 5), Is.All.EqualTo(1), "the shared pages moved for the child too");
        AssertBytes(p, va, bytes);
        AssertBytes(child, va, bytes);
        TestMachines.AssertAuditClean(machine);
    }
}
