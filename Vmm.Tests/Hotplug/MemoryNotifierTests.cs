using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Hotplug;

/// <summary>
/// The memory notifier chain: order by priority (equal priorities in registration order), every event
/// with its payload (including the node that loses its last block or gains its first), vetoes from the
/// GOING_ events (the caller gets the error, everyone hears the CANCEL, nothing changed), callbacks that
/// throw, callbacks that try to change a block's state, unregistration.
/// </summary>
[TestFixture]
[Category("Hotplug")]
[Category("Smoke")]
public sealed class MemoryNotifierTests
{
    /// <summary>Blocks of <see cref="TestMachines.TwoNodes"/>: node 0 is blocks 0 (NORMAL) and 1 (MOVABLE), node 1 blocks 2 and 3.</summary>
    private const int MovableOfNode0 = 1, NormalOfNode1 = 2, MovableOfNode1 = 3;

    private static readonly string[] NestedChanges = ["Offline", "state write", "Online"];

    private sealed class CallbackFailure(string message) : Exception(message);

    /// <summary>What one callback heard, in order.</summary>
    private sealed class Recorder
    {
        public List<(MemoryNotifierEvent Event, MemoryNotification Notification)> Heard { get; } = [];
        public IEnumerable<MemoryNotifierEvent> Events => Heard.Select(h => h.Event);
    }

    private static Machine NewMachine() => TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });

    private static IDisposable Register(Machine machine, Recorder recorder, int priority, Func<MemoryNotifierEvent, Errno>? answer = null) =>
        machine.Hotplug.RegisterNotifier((action, n) =>
        {
            recorder.Heard.Add((action, n));
            return answer?.Invoke(action) ?? Errno.None;
        }, priority);

    [Test]
    public void Callbacks_run_by_priority_higher_first_and_equal_priorities_in_registration_order()
    {
        using Machine machine = NewMachine();
        var order = new List<string>();
        var registrations = new List<IDisposable>();
        foreach ((string name, int priority) in new[] { ("a10", 10), ("low-5", -5), ("top200", 200), ("b10", 10), ("mid0", 0), ("c10", 10) })
            registrations.Add(machine.Hotplug.RegisterNotifier((action, _) => { order.Add($"{action} {name}"); return Errno.None; }, priority));
        string[] byPriority = ["top200", "a10", "b10", "c10", "mid0", "low-5"];

        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(block.Online(), Is.EqualTo(Errno.None));

        string[] expected =
        [
            .. byPriority.Select(n => $"GoingOffline {n}"), .. byPriority.Select(n => $"Offline {n}"),
            .. byPriority.Select(n => $"GoingOnline {n}"), .. byPriority.Select(n => $"Online {n}"),
        ];
        Assert.That(order, Is.EqualTo(expected));
        registrations.ForEach(r => r.Dispose());
    }

    [Test]
    public void Every_event_carries_the_block_and_the_node_that_loses_its_last_block_or_regains_its_first()
    {
        using Machine machine = NewMachine();
        var recorder = new Recorder();
        using IDisposable registration = Register(machine, recorder, 0);
        MemoryBlock movable = machine.Hotplug.GetBlock(MovableOfNode1), normal = machine.Hotplug.GetBlock(NormalOfNode1);
        var movableOnly = new MemoryNotification(movable.StartPfn, movable.Frames, -1);
        var normalLast = new MemoryNotification(normal.StartPfn, normal.Frames, 1);
        Assert.That(movable.Frames, Is.EqualTo((8L << 20) / 4096));

        Assert.That(movable.Offline().Error, Is.EqualTo(Errno.None), "node 1 keeps block 2");
        Assert.That(normal.Offline().Error, Is.EqualTo(Errno.None), "node 1 loses its last block");
        Assert.That(normal.Online(), Is.EqualTo(Errno.None), "node 1 gains its first block again");
        Assert.That(movable.Online(), Is.EqualTo(Errno.None), "node 1 has memory already");

        Assert.That(recorder.Heard, Is.EqualTo(new[]
        {
            (MemoryNotifierEvent.GoingOffline, movableOnly), (MemoryNotifierEvent.Offline, movableOnly),
            (MemoryNotifierEvent.GoingOffline, normalLast), (MemoryNotifierEvent.Offline, normalLast),
            (MemoryNotifierEvent.GoingOnline, normalLast), (MemoryNotifierEvent.Online, normalLast),
            (MemoryNotifierEvent.GoingOnline, movableOnly), (MemoryNotifierEvent.Online, movableOnly),
        }));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_veto_from_going_offline_returns_its_error_every_callback_hears_the_cancel_and_nothing_changes()
    {
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(400 * 4096);
        byte[] data = WriteRandomPages(p, va, 400, seed: 5);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        // The offline drains the per-CPU lists into the buddy lists, which GetMemoryBlock counts: drain them
        // (and the deferred puts and LRU batches that feed them) first, so "as before" compares like with like.
        machine.Tlb.Flush();
        machine.Lru.DrainAll();
        machine.Allocator.DrainAllPages();
        MemoryBlockInfo infoBefore = machine.GetMemoryBlock(MovableOfNode0);
        long[] pfnsBefore = [.. Enumerable.Range(0, 400).Select(i => p.GetPagemap(va + (ulong)i * 4096).Pfn)];
        Assert.That(pfnsBefore.Count(pfn => machine.Topology.BlockOf(pfn) == MovableOfNode0), Is.GreaterThan(0));
        long managedBefore = machine.GetStats().MemTotalBytes;

        Recorder before = new(), vetoer = new(), after = new();
        using IDisposable r1 = Register(machine, before, 10);
        using IDisposable r2 = Register(machine, vetoer, 5, e => e == MemoryNotifierEvent.GoingOffline ? Errno.EAGAIN : Errno.None);
        using IDisposable r3 = Register(machine, after, 0);

        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.EAGAIN), "the caller gets the callback's error");
        Assert.That(result.Blockers.Single().Reason, Is.EqualTo(OfflineBlockReason.NotifierVeto));
        Assert.That(result.PagesMoved, Is.Zero);
        Assert.That(before.Events, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOffline, MemoryNotifierEvent.CancelOffline }));
        Assert.That(vetoer.Events, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOffline, MemoryNotifierEvent.CancelOffline }));
        Assert.That(after.Events, Is.EqualTo(new[] { MemoryNotifierEvent.CancelOffline }), "the chain stops at the veto; the cancel reaches everyone");
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));
        Assert.That(machine.GetMemoryBlock(MovableOfNode0), Is.EqualTo(infoBefore), "free frames as before, none left isolated");
        Assert.That(machine.GetStats().MemTotalBytes, Is.EqualTo(managedBefore));
        Assert.That(Enumerable.Range(0, 400).Select(i => p.GetPagemap(va + (ulong)i * 4096).Pfn), Is.EqualTo(pfnsBefore), "no page moved");
        Assert.That(ReadPages(p, va, 400), Is.EqualTo(data));
        Assert.That(machine.Ksm!.IsOfflining, Is.False, "KSM's scanner is let go again");
        Assert.That(block.Write("state", "offline"), Is.EqualTo(Errno.EAGAIN), "a state write returns the veto too");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_veto_from_going_online_returns_its_error_every_callback_hears_the_cancel_and_the_block_stays_offline()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        long managedOffline = machine.GetStats().MemTotalBytes;
        Recorder before = new(), vetoer = new(), after = new();
        using IDisposable r1 = Register(machine, before, 10);
        using IDisposable r2 = Register(machine, vetoer, 5, e => e == MemoryNotifierEvent.GoingOnline ? Errno.ENOMEM : Errno.None);
        using IDisposable r3 = Register(machine, after, 0);

        Assert.That(block.Write("state", "online_movable"), Is.EqualTo(Errno.ENOMEM));

        Assert.That(before.Events, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOnline, MemoryNotifierEvent.CancelOnline }));
        Assert.That(vetoer.Events, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOnline, MemoryNotifierEvent.CancelOnline }));
        Assert.That(after.Events, Is.EqualTo(new[] { MemoryNotifierEvent.CancelOnline }));
        Assert.That(block.State, Is.EqualTo("offline"));
        Assert.That(block.Zone, Is.Null);
        Assert.That(machine.GetStats().MemTotalBytes, Is.EqualTo(managedOffline));
        Assert.That(machine.Hotplug.OnlineCount, Is.Zero);
        TestMachines.AssertAuditClean(machine);

        r2.Dispose();
        Assert.That(block.Online(ZoneType.Movable), Is.EqualTo(Errno.None), "without the veto it comes online");
        Assert.That(after.Events.TakeLast(2), Is.EqualTo(new[] { MemoryNotifierEvent.GoingOnline, MemoryNotifierEvent.Online }));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_callback_that_throws_at_going_offline_cancels_the_offline_and_the_exception_reaches_the_caller()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        var other = new Recorder();
        using IDisposable thrower = machine.Hotplug.RegisterNotifier((action, _) =>
            action == MemoryNotifierEvent.GoingOffline ? throw new CallbackFailure("refused") : Errno.None, 10);
        using IDisposable registration = Register(machine, other, 0);

        Assert.That(() => block.Offline(), Throws.TypeOf<CallbackFailure>());

        Assert.That(other.Events, Is.EqualTo(new[] { MemoryNotifierEvent.CancelOffline }));
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(machine.GetMemoryBlock(MovableOfNode0).IsolatedFreeFrames, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_callback_that_throws_after_the_change_does_not_undo_it_and_the_others_still_hear_it()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        var other = new Recorder();
        using IDisposable thrower = machine.Hotplug.RegisterNotifier((action, _) =>
            action is MemoryNotifierEvent.Offline or MemoryNotifierEvent.Online ? throw new CallbackFailure("late") : Errno.None, 10);
        using IDisposable registration = Register(machine, other, 0);

        Assert.That(() => block.Offline(), Throws.TypeOf<CallbackFailure>());
        Assert.That(block.State, Is.EqualTo("offline"), "MEM_OFFLINE cannot veto: the block is offline");
        Assert.That(() => block.Online(), Throws.TypeOf<CallbackFailure>());
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(other.Events, Is.EqualTo(new[]
        {
            MemoryNotifierEvent.GoingOffline, MemoryNotifierEvent.Offline, MemoryNotifierEvent.GoingOnline, MemoryNotifierEvent.Online,
        }));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_callback_that_changes_a_block_state_gets_InvalidOperationException_and_the_change_in_progress_goes_on()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0), other = machine.Hotplug.GetBlock(MovableOfNode1);
        var caught = new List<string>();
        using IDisposable registration = machine.Hotplug.RegisterNotifier((action, _) =>
        {
            if (action != MemoryNotifierEvent.GoingOffline)
                return Errno.None;
            foreach ((string name, Action change) in new (string, Action)[]
            {
                ("Offline", () => other.Offline()),
                ("state write", () => other.Write("state", "offline")),
                ("Online", () => block.Online()),
            })
            {
                try
                {
                    change();
                }
                catch (InvalidOperationException)
                {
                    caught.Add(name);
                }
            }
            return Errno.None;
        });

        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(caught, Is.EqualTo(NestedChanges));
        Assert.That(other.State, Is.EqualTo("online"), "the nested change did nothing");
        Assert.That(block.State, Is.EqualTo("offline"));
        Assert.That(() => other.Offline(), Throws.Nothing, "outside a callback the same call works");
        Assert.That(other.State, Is.EqualTo("offline"));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_unregistered_callback_hears_nothing_more()
    {
        using Machine machine = NewMachine();
        int baseline = machine.Hotplug.NotifierCount;
        var recorder = new Recorder();
        IDisposable registration = Register(machine, recorder, 0);
        Assert.That(machine.Hotplug.NotifierCount, Is.EqualTo(baseline + 1));
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));

        registration.Dispose();
        registration.Dispose();
        Assert.That(block.Online(), Is.EqualTo(Errno.None));

        Assert.That(recorder.Events, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOffline, MemoryNotifierEvent.Offline }));
        Assert.That(machine.Hotplug.NotifierCount, Is.EqualTo(baseline), "disposing twice removes it once");
    }
}
