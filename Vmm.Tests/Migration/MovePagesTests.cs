using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// move_pages (VmProcess.MovePages, Migration/PageMoves.cs): the report, every whole-call errno, every
/// per-page status, and pages that move, stay byte-identical and keep every mapping.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class MovePagesTests
{
    private const int Page = 4096;
    private const int ENOENT = -(int)Errno.ENOENT;
    private const int EFAULT = -(int)Errno.EFAULT;
    private const int EACCES = -(int)Errno.EACCES;
    private const int EBUSY = -(int)Errno.EBUSY;

    private static ulong[] PagesOf(ulong va, int count) => [.. Enumerable.Range(0, count).Select(i => va + (ulong)(i * Page))];

    /// <summary>
    /// Maps <paramref name="pages"/> pages in <paramref name="p"/>, writes random bytes into them (seeded by
    /// the page count) and returns the address and the bytes read back: the contents a move must keep.
    /// </summary>
    private static (ulong Va, byte[] Before) MapRandomPages(VmProcess p, int pages)
    {
        ulong va = p.Mmap((ulong)(pages * Page));
        WriteRandomPages(p, va, pages, seed: pages);
        return (va, ReadPages(p, va, pages));
    }

    // ---------------------------------------------------------------------------------------------
    // The report (nodes null)
    // ---------------------------------------------------------------------------------------------

    [Test]
    public void Without_nodes_it_reports_each_page_node_or_why_there_is_none()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess(homeNode: 1);
        ulong va = p.Mmap(4 * Page);
        p.Write<int>(va, 1);                          // present, on node 1
        _ = p.Read<int>(va + Page);                   // the zero page
        // va + 2 pages: never touched
        Assert.That(p.Munmap(va + 3 * Page, Page), Is.EqualTo(Errno.None));
        ulong[] pages = [va + 5, va + Page, va + 2 * Page, va + 3 * Page, 0x7FFF_FFFF_F000, ulong.MaxValue];
        var status = new int[pages.Length];

        Assert.That(p.MovePages(0, pages, null, status), Is.EqualTo(Errno.None));

        Assert.That(status, Is.EqualTo(Expected(1, ENOENT, ENOENT, EFAULT, EFAULT, EFAULT)),
            "node of a present page (any address in it), ENOENT for the zero page and an untouched page, EFAULT where nothing is mapped or outside user space");
        Assert.That(NodeOf(p, va), Is.EqualTo(1), "a report moves nothing");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_report_of_another_process_names_its_nodes()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess caller = machine.CreateProcess();
        VmProcess target = machine.CreateProcess(homeNode: 1);
        ulong va = target.Mmap(2 * Page);
        target.Fill(va, 2 * Page, 7);
        var status = new int[2];
        Assert.That(caller.MovePages(target.Pid, PagesOf(va, 2), null, status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.EqualTo(Expected(1, 1)));
    }

    [Test]
    public void An_empty_page_list_succeeds_and_touches_nothing()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.MovePages(0, [], [], []), Is.EqualTo(Errno.None));
        Assert.That(p.MovePages(0, [], null, []), Is.EqualTo(Errno.None));
    }

    // ---------------------------------------------------------------------------------------------
    // Whole-call errors
    // ---------------------------------------------------------------------------------------------

    [TestCase(MovePolicyFlags.Strict)]
    [TestCase(MovePolicyFlags.Move | MovePolicyFlags.Strict)]
    [TestCase((MovePolicyFlags)(1 << 5))]
    public void A_flag_other_than_Move_and_MoveAll_is_EINVAL_and_moves_nothing(MovePolicyFlags flags)
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 1, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var status = new int[] { 99 };
        Assert.That(p.MovePages(0, [va], [1], status, flags), Is.EqualTo(Errno.EINVAL));
        Assert.That(NodeOf(p, va), Is.Zero);
        Assert.That(status[0], Is.EqualTo(99), "no status is written on a whole-call error");
    }

    [Test]
    public void No_flag_at_all_is_a_plain_move()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 1, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var status = new int[1];
        Assert.That(p.MovePages(0, [va], [1], status, MovePolicyFlags.None), Is.EqualTo(Errno.None), "Linux accepts flags 0");
        Assert.That(status[0], Is.EqualTo(1));
    }

    [Test]
    public void MoveAll_without_CAP_SYS_NICE_is_EPERM_even_on_its_own_pages()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess(Credentials.User(1000));
        ulong va = p.Mmap(Page);
        p.Write<int>(va, 1);
        Assert.That(p.MovePages(0, [va], [1], new int[1], MovePolicyFlags.MoveAll), Is.EqualTo(Errno.EPERM));
        Assert.That(NodeOf(p, va), Is.Zero);
        Assert.That(p.MovePages(0, [va], [1], new int[1]), Is.EqualTo(Errno.None), "MOVE alone needs nothing for its own pages");
        Assert.That(NodeOf(p, va), Is.EqualTo(1));
    }

    [Test]
    public void An_unknown_pid_is_ESRCH_and_an_exited_process_is_gone_too()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess caller = machine.CreateProcess();
        VmProcess gone = machine.CreateProcess();
        gone.Exit();
        Assert.That(caller.MovePages(12345, [0x10000], null, new int[1]), Is.EqualTo(Errno.ESRCH));
        Assert.That(caller.MovePages(-1, [0x10000], null, new int[1]), Is.EqualTo(Errno.ESRCH));
        Assert.That(caller.MovePages(gone.Pid, [0x10000], null, new int[1]), Is.EqualTo(Errno.ESRCH));
    }

    [Test]
    public void A_process_that_has_exited_has_no_mm_to_move_EINVAL()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        p.Exit();
        Assert.That(p.MovePages(0, [0x10000], null, new int[1]), Is.EqualTo(Errno.EINVAL), "get_task_mm finds no mm");
        Assert.That(p.MovePages(p.Pid, [0x10000], [1], new int[1]), Is.EqualTo(Errno.EINVAL));
    }

    [Test]
    public void Another_user_process_needs_CAP_SYS_NICE_EPERM()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess user = machine.CreateProcess(Credentials.User(1000));
        VmProcess other = machine.CreateProcess(Credentials.User(2000));
        ulong va = other.Mmap(Page);
        other.Write<int>(va, 1);
        Assert.That(user.MovePages(other.Pid, [va], [1], new int[1]), Is.EqualTo(Errno.EPERM));
        Assert.That(user.MovePages(other.Pid, [va], null, new int[1]), Is.EqualTo(Errno.EPERM), "even a report (ptrace_may_access)");
        Assert.That(NodeOf(other, va), Is.Zero);

        VmProcess sameUser = machine.CreateProcess(Credentials.User(2000));
        var status = new int[1];
        Assert.That(sameUser.MovePages(other.Pid, [va], [1], status), Is.EqualTo(Errno.None), "the same user may");
        Assert.That(status[0], Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Every_check_uses_the_callers_credentials_of_the_moment()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess caller = machine.CreateProcess();                  // root
        VmProcess other = machine.CreateProcess(Credentials.User(3000));
        ulong va = other.Mmap(2 * Page);
        other.Fill(va, 2 * Page, 3);
        var status = new int[1];

        Assert.That(caller.MovePages(other.Pid, [va], [1], status), Is.EqualTo(Errno.None), "root with CAP_SYS_NICE");
        Assert.That(caller.Capset(Capabilities.None), Is.EqualTo(Errno.None));
        Assert.That(caller.MovePages(other.Pid, [va + Page], [1], status), Is.EqualTo(Errno.EPERM), "CAP_SYS_NICE dropped: uid 0 is not uid 3000");
        Assert.That(caller.Capset(Capabilities.SysNice | Capabilities.SetUid), Is.EqualTo(Errno.None), "still permitted: take them back");
        Assert.That(caller.MovePages(other.Pid, [va + Page], [1], status), Is.EqualTo(Errno.None));

        Assert.That(caller.SetEuid(3000), Is.EqualTo(Errno.None), "seteuid away from 0 clears the effective set");
        Assert.That(caller.MovePages(other.Pid, [va], [0], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.EPERM), "no CAP_SYS_NICE for MOVE_ALL");
        Assert.That(caller.MovePages(other.Pid, [va], [0], status), Is.EqualTo(Errno.None), "the effective uid matches the target's");
        Assert.That(caller.SetEuid(0), Is.EqualTo(Errno.None));
        Assert.That(caller.MovePages(other.Pid, [va], [1], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None), "back to root: CAP_SYS_NICE again");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_status_or_node_array_shorter_than_the_pages_is_EFAULT_before_anything_moves()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * Page, fill: 1, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        ulong[] pages = PagesOf(va, 2);
        Assert.That(p.MovePages(0, pages, [1, 1], new int[1]), Is.EqualTo(Errno.EFAULT));
        Assert.That(p.MovePages(0, pages, [1], new int[2]), Is.EqualTo(Errno.EFAULT));
        Assert.That(p.MovePages(0, pages, null, new int[1]), Is.EqualTo(Errno.EFAULT));
        Assert.That(NodeOf(p, va), Is.Zero, "nothing moved");
        Assert.That(p.MovePages(0, pages, [1, 1, 0], new int[3]), Is.EqualTo(Errno.None), "longer arrays are fine: only the first entries count");
        Assert.That(NodeOf(p, va + Page), Is.EqualTo(1));
    }

    [Test]
    public void Null_arrays_are_a_programming_error()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        Assert.Throws<ArgumentNullException>(() => p.MovePages(0, null!, null, new int[1]));
        Assert.Throws<ArgumentNullException>(() => p.MovePages(0, [0x10000], null, null!));
    }

    [TestCase(2)]
    [TestCase(-1)]
    [TestCase(64)]
    [TestCase(int.MaxValue)]
    public void A_node_the_machine_does_not_have_is_ENODEV_and_no_page_moves(int badNode)
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * Page, fill: 1, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var status = new int[] { 99, 99 };
        Assert.That(p.MovePages(0, PagesOf(va, 2), [1, badNode], status), Is.EqualTo(Errno.ENODEV));
        Assert.That(NodeOf(p, va), Is.Zero, "the good entry before the bad one did not move either");
        Assert.That(status, Is.EqualTo(Expected(99, 99)));
        TestMachines.AssertAuditClean(machine);
    }

    // ---------------------------------------------------------------------------------------------
    // Moving
    // ---------------------------------------------------------------------------------------------

    [Test]
    public void Pages_move_to_their_nodes_and_stay_byte_identical()
    {
        const int count = 64;
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        (ulong va, byte[] before) = MapRandomPages(p, count);
        var status = new int[count];

        Assert.That(p.MovePages(0, PagesOf(va, count), Enumerable.Repeat(1, count).ToArray(), status), Is.EqualTo(Errno.None));

        Assert.That(status, Is.All.EqualTo(1));
        Assert.That(NodesOf(p, va, count), Is.All.EqualTo(1));
        Assert.That(ReadPages(p, va, count), Is.EqualTo(before), "every byte moved with its page");
        Assert.That(p.RssAnonPages, Is.EqualTo(count));
        MigrationStats stats = machine.GetMigrationStats();
        Assert.That((stats.SucceededByReason[MigrateReason.Syscall], stats.Failed), Is.EqualTo(((long)count, 0L)),
            "the engine moved them for MR_SYSCALL (pgmigrate_success)");
        p.Write<long>(va, 42); // the moved pages are still writable in place
        Assert.That(p.Read<long>(va), Is.EqualTo(42));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Runs_to_different_nodes_each_land_where_asked()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        (ulong va, byte[] before) = MapRandomPages(p, 6);
        int[] nodes = [1, 1, 0, 1, 0, 0];
        var status = new int[6];
        Assert.That(p.MovePages(0, PagesOf(va, 6), nodes, status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.EqualTo(nodes), "the node of each page, moved or already there");
        Assert.That(NodesOf(p, va, 6), Is.EqualTo(nodes));
        Assert.That(ReadPages(p, va, 6), Is.EqualTo(before));

        Assert.That(p.MovePages(0, PagesOf(va, 6), [0, 0, 0, 0, 0, 0], status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.All.Zero, "and back");
        Assert.That(ReadPages(p, va, 6), Is.EqualTo(before));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Per_page_failures_show_in_status_and_the_other_pages_still_move()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4 * Page);
        p.Write<int>(va, 1);
        _ = p.Read<int>(va + Page);                 // zero page
        // va + 2 pages untouched
        p.Write<int>(va + 3 * Page, 4);
        ulong[] pages = [va, va + Page, va + 2 * Page, 0x10000, va + 3 * Page];
        var status = new int[pages.Length];

        Assert.That(p.MovePages(0, pages, [1, 1, 1, 1, 1], status), Is.EqualTo(Errno.None));

        Assert.That(status, Is.EqualTo(Expected(1, ENOENT, ENOENT, EFAULT, 1)));
        Assert.That(NodeOf(p, va + 3 * Page), Is.EqualTo(1));
        Assert.That(p.Read<int>(va + 3 * Page), Is.EqualTo(4));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_pinned_page_reports_EBUSY_and_stays()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * Page, fill: 9, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var status = new int[2];
        using (PinnedMemory pin = p.Pin(va, Page, write: true))
        {
            Assert.That(p.MovePages(0, PagesOf(va, 2), [1, 1], status), Is.EqualTo(Errno.None));
            Assert.That(status, Is.EqualTo(Expected(EBUSY, 1)), "a pinned page cannot move (its pin would point at the old frame)");
            Assert.That(NodeOf(p, va), Is.Zero);
            Assert.That(machine.ReadVmStat("nr_isolated_anon", out long isolated), Is.EqualTo(Errno.None));
            Assert.That(isolated, Is.Zero, "the page that stayed went back on its LRU list");
            Assert.That(machine.GetMigrationStats().FailedByReason[MigrateReason.Syscall], Is.EqualTo(1L), "pgmigrate_fail counts it");
            TestMachines.AssertAuditClean(machine);
        }
        Assert.That(p.MovePages(0, [va], [1], status), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1), "unpinned, it moves");
        Assert.That(p.Read<byte>(va + 17), Is.EqualTo(9));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_shared_with_a_child_needs_MoveAll_and_then_moves_for_both()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(2 * Page);
        parent.Fill(va, 2 * Page, 0x33);
        VmProcess child = parent.Fork();
        child.Write<byte>(va + Page, 0x44); // the second page is the child's own copy now
        var status = new int[2];

        Assert.That(parent.MovePages(0, PagesOf(va, 2), [1, 1], status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.EqualTo(Expected(EACCES, 1)), "mapped twice: EACCES without MOVE_ALL; the exclusive page moves");
        Assert.That(NodeOf(parent, va), Is.Zero);

        Assert.That(parent.MovePages(0, [va], [1], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1));
        Assert.That(NodeOf(child, va), Is.EqualTo(1), "the child's mapping follows the page");
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(parent.GetPagemap(va).Pfn), "still one shared page");
        child.Write<byte>(va, 0x55);
        Assert.That(parent.Read<byte>(va), Is.EqualTo(0x33), "still copy-on-write");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_shared_mapping_page_moves_while_one_process_maps_it_and_needs_MoveAll_once_two_do()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess a = machine.CreateProcess();
        Assert.That(a.Mmap(0, Page, Protection.ReadWrite, MapFlags.Shared, out ulong va), Is.EqualTo(Errno.None));
        a.Write<int>(va, 10);
        var status = new int[1];
        Assert.That(a.MovePages(0, [va], [1], status), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1));

        VmProcess b = a.Fork();
        Assert.That(a.MovePages(0, [va], [0], status), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(EACCES));
        Assert.That(a.MovePages(0, [va], [0], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.Zero);
        b.Write<int>(va, 11);
        Assert.That(a.Read<int>(va), Is.EqualTo(11), "one page cache page, still shared");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_named_twice_in_one_run_moves_once_and_the_second_entry_is_EBUSY()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 2, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var status = new int[3];
        Assert.That(p.MovePages(0, [va, va + 8, va], [1, 1, 0], status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.EqualTo(Expected(1, EBUSY, 0)),
            "taken for migration once (Linux's isolation fails the second time); the next run moves it back");
        Assert.That(NodeOf(p, va), Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_PROT_NONE_page_moves_and_stays_inaccessible()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(Page, fill: 5, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        Assert.That(p.Mprotect(va, Page, Protection.None), Is.EqualTo(Errno.None));
        var status = new int[1];
        Assert.That(p.MovePages(0, [va], [1], status), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1));
        Assert.Throws<SegmentationFault>(() => p.Read<byte>(va));
        Assert.That(p.Mprotect(va, Page, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(p.Read<byte>(va), Is.EqualTo(5));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_pages_of_another_process_move_when_the_caller_may()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess admin = machine.CreateProcess();
        VmProcess worker = machine.CreateProcess(Credentials.User(1000));
        (ulong va, byte[] before) = MapRandomPages(worker, 8);
        var status = new int[8];
        Assert.That(admin.MovePages(worker.Pid, PagesOf(va, 8), Enumerable.Repeat(1, 8).ToArray(), status), Is.EqualTo(Errno.None));
        Assert.That(status, Is.All.EqualTo(1));
        Assert.That(ReadPages(worker, va, 8), Is.EqualTo(before));
        Assert.That(admin.RssAnonPages, Is.Zero, "the caller's own memory is not involved");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_node_without_a_free_frame_reports_ENOMEM_and_the_page_stays_intact()
    {
        // The first user frame (the fault's) is served; the second (the move's target) fails.
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with
        {
            FaultInjection = new FaultInjection { Space = 1, Times = 1, IgnoreUnmovable = true },
        });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Write<int>(va, 77);
        var status = new int[1];
        Assert.That(p.MovePages(0, [va], [1], status), Is.EqualTo(Errno.None), "not a whole-call error: the status says it");
        Assert.That(status[0], Is.EqualTo(-(int)Errno.ENOMEM));
        Assert.That(NodeOf(p, va), Is.Zero);
        Assert.That(p.Read<int>(va), Is.EqualTo(77));
        Assert.That(machine.GetFaultInjectionStats().TotalFailures, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_merged_KSM_page_needs_MoveAll_and_then_moves_and_stays_merged()
    {
        using Machine machine = TestMachines.CreateForKsm();
        VmProcess a = machine.CreateProcess();
        VmProcess b = machine.CreateProcess();
        ulong va = a.Mmap(Page), vb = b.Mmap(Page);
        a.Fill(va, Page, 0x5A);
        b.Fill(vb, Page, 0x5A);
        Assert.That(a.Madvise(va, Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        Assert.That(b.Madvise(vb, Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(2);
        Assert.That(a.GetPagemap(va).Ksm && a.GetPagemap(va).Pfn == b.GetPagemap(vb).Pfn, Is.True, "setup: one KSM page");
        var status = new int[1];

        Assert.That(a.MovePages(0, [va], [1], status), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(EACCES), "a KSM page shared by two processes is mapped twice");
        Assert.That(a.MovePages(0, [va], [1], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1));

        PagemapEntry ea = a.GetPagemap(va), eb = b.GetPagemap(vb);
        Assert.That((ea.Node, ea.Ksm, eb.Pfn), Is.EqualTo((1, true, ea.Pfn)), "still one KSM page, now on node 1, for both");
        Assert.That(b.Read<byte>(vb + 100), Is.EqualTo(0x5A));
        Assert.That(machine.Ksm.GetStats().PagesSharing, Is.EqualTo(1L));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Stress")]
    public void Pages_moving_back_and_forth_under_a_writer_and_a_reporter_lose_no_write()
    {
        const int count = 16;
        int rounds = 40 * TestEnvironment.StressScale;
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(count * Page);
        p.Fill(va, count * Page, 0);
        ulong[] pages = PagesOf(va, count);
        var last = new long[count];
        using var stop = new CancellationTokenSource();

        var writer = Task.Run(() =>
        {
            for (long value = 1; !stop.IsCancellationRequested; value++)
            {
                int page = (int)(value % count);
                p.Write(pages[page] + (ulong)(8 * (value % 16)), value);
                p.Write(pages[page], value);
                Volatile.Write(ref last[page], value);
            }
        });
        var reporter = Task.Run(() =>
        {
            var status = new int[count];
            while (!stop.IsCancellationRequested)
            {
                Assert.That(p.MovePages(0, pages, null, status), Is.EqualTo(Errno.None));
                Assert.That(status, Is.All.InRange(0, 1), "a page under migration is waited for, never reported missing");
            }
        });
        try
        {
            var status = new int[count];
            int moved = 0;
            for (int round = 0; round < rounds; round++)
            {
                int node = round % 2 == 0 ? 1 : 0;
                Assert.That(p.MovePages(0, pages, [.. Enumerable.Repeat(node, count)], status), Is.EqualTo(Errno.None));
                Assert.That(status, Is.All.EqualTo(node).Or.EqualTo(EBUSY), "moved, or busy for every pass under the writer");
                moved += status.Count(s => s == node);
            }
            Assert.That(moved, Is.GreaterThan(rounds * count / 2), "most moves succeed while the writer runs");
        }
        finally
        {
            stop.Cancel();
            Task.WaitAll(writer, reporter);
        }
        for (int page = 0; page < count; page++)
            Assert.That(p.Read<long>(pages[page]), Is.EqualTo(last[page]), $"page {page} kept its last write");
        TestMachines.AssertAuditClean(machine);
    }
}
