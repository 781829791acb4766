using Vmm.Memory;

namespace Vmm.Tests.Memory;

[TestFixture]
[Category("Smoke")]
public sealed class PageLockTests
{
    [Test]
    public void Trylock_fails_while_held_and_succeeds_after_unlock()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        PageLock pageLock = machine.PageLock;
        Assert.That(pageLock.TryLock(pfn), Is.True);
        Assert.That(pageLock.IsLocked(pfn), Is.True);
        Assert.That(machine.GetPageInfo(pfn).Flags.HasFlag(PageFlags.Locked), Is.True, "the lock is PG_locked");
        Assert.That(pageLock.TryLock(pfn), Is.False);
        pageLock.Unlock(pfn);
        Assert.That(pageLock.TryLock(pfn), Is.True);
        pageLock.Unlock(pfn);
        Assert.Throws<VmBugException>(() => pageLock.Unlock(pfn), "unlocking an unlocked page is a bug");
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void Freeing_a_locked_page_is_refused()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.PageLock.Lock(pfn);
        Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(pfn));
        machine.PageLock.Unlock(pfn);
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void Contended_lockers_exclude_each_other_and_all_get_through()
    {
        using var machine = TestMachines.Create();
        long[] pages = [.. Enumerable.Range(0, 3).Select(_ => machine.Allocator.AllocPages(0, AllocFlags.Movable))];
        PageLock pageLock = machine.PageLock;
        var counters = new long[pages.Length];
        var inside = new int[pages.Length];
        int overlaps = 0;
        int iterations = 20_000 * TestEnvironment.StressScale;
        Thread[] threads = [.. Enumerable.Range(0, 6).Select(id => new Thread(() =>
        {
            var random = new Random(id);
            for (int i = 0; i < iterations; i++)
            {
                int k = random.Next(pages.Length);
                pageLock.Lock(pages[k]);
                if (Interlocked.Increment(ref inside[k]) != 1)
                    Interlocked.Increment(ref overlaps);
                counters[k]++; // not atomic on purpose: the page lock must protect it
                if (i % 1000 == 0)
                    Thread.Sleep(0);
                Interlocked.Decrement(ref inside[k]);
                pageLock.Unlock(pages[k]);
            }
        }))];
        foreach (Thread t in threads)
            t.Start();
        foreach (Thread t in threads)
            t.Join();
        Assert.That(overlaps, Is.Zero, "two threads never hold one page lock");
        Assert.That(counters.Sum(), Is.EqualTo(6L * iterations), "no increment was lost");
        Assert.That(pages.Select(p => machine.GetPageInfo(p).Flags & (PageFlags.Locked | PageFlags.Waiters)), Is.All.EqualTo(PageFlags.None));
    }

    [Test]
    public void A_sleeping_waiter_is_woken_by_unlock()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        PageLock pageLock = machine.PageLock;
        pageLock.Lock(pfn);
        using var acquired = new ManualResetEventSlim();
        var waiter = new Thread(() =>
        {
            pageLock.Lock(pfn);
            acquired.Set();
            pageLock.Unlock(pfn);
        });
        waiter.Start();
        SpinWait.SpinUntil(() => machine.GetPageInfo(pfn).Flags.HasFlag(PageFlags.Waiters), TimeSpan.FromSeconds(10));
        Assert.That(machine.GetPageInfo(pfn).Flags.HasFlag(PageFlags.Waiters), Is.True, "the waiter announced itself with PG_waiters");
        Assert.That(acquired.IsSet, Is.False, "it cannot have the lock yet");
        pageLock.Unlock(pfn);
        Assert.That(acquired.Wait(TimeSpan.FromSeconds(10)), Is.True, "unlock woke it");
        waiter.Join();
    }

    [Test]
    public void WaitUnlocked_returns_once_the_holder_unlocks_and_cancellation_abandons_a_wait()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        PageLock pageLock = machine.PageLock;
        pageLock.Lock(pfn);
        using var cts = new CancellationTokenSource();
        bool? gotIt = null;
        var canceller = new Thread(() => gotIt = pageLock.Lock(pfn, cts.Token));
        canceller.Start();
        var waiter = new Thread(() => pageLock.WaitUnlocked(pfn));
        waiter.Start();
        Thread.Sleep(50);
        cts.Cancel();
        canceller.Join();
        Assert.That(gotIt, Is.False, "a cancelled lock attempt gives up without the lock");
        Assert.That(waiter.IsAlive, Is.True, "the waiter still waits");
        pageLock.Unlock(pfn);
        Assert.That(waiter.Join(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(pageLock.IsLocked(pfn), Is.False, "WaitUnlocked does not take the lock");
    }
}
