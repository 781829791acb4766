// PageLock: PG_locked as a sleeping lock (Linux's lock_page / trylock_page / unlock_page).
//
// The lock is one bit in the descriptor's flags, so it costs no memory per frame. Contended lockers
// sleep on a small hashed table of wait queues (Linux's page_wait_table): many frames share a queue,
// and a woken waiter re-checks its own frame. PG_waiters tells unlock whether anyone may sleep, so an
// uncontended unlock is one atomic instruction and never touches the table.
//
// The race that matters: a waiter sets PG_waiters and then finds the lock still held, while the
// holder clears PG_locked and then looks at PG_waiters. Both steps are atomic read-modify-writes on
// the same word, so one of them sees the other: either the waiter sees the lock free (and takes it),
// or the unlocker sees PG_waiters (and wakes the queue, which it can only enter after the waiter is
// asleep on it, because the waiter holds the queue's monitor from setting PG_waiters to Monitor.Wait).
using System.Runtime.CompilerServices;

namespace Vmm.Memory;

/// <summary>The page lock (PG_locked) with blocking waiters. A frame must be referenced by its user.</summary>
internal sealed class PageLock
{
    private const int WaitTableBits = 8;
    private const int SpinsBeforeSleep = 64;
    private const ulong LockedBit = (ulong)PageFlags.Locked;
    private const ulong WaitersBit = (ulong)PageFlags.Waiters;

    private readonly MemMap _memMap;
    private readonly object[] _waitTable;

    public PageLock(MemMap memMap)
    {
        _memMap = memMap;
        _waitTable = new object[1 << WaitTableBits];
        for (int i = 0; i < _waitTable.Length; i++)
            _waitTable[i] = new object();
    }

    /// <summary>trylock_page: takes the lock if it is free; never waits.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryLock(long pfn)
    {
        ref ulong flags = ref FlagsOf(pfn);
        return (Interlocked.Or(ref flags, LockedBit) & LockedBit) == 0;
    }

    /// <summary>lock_page: takes the lock, sleeping while another thread holds it.</summary>
    public void Lock(long pfn)
    {
        if (!TryLock(pfn))
            LockSlow(pfn, CancellationToken.None);
    }

    /// <summary>lock_page_killable: takes the lock or gives up when <paramref name="cancellationToken"/> fires.</summary>
    /// <returns>False if cancelled before the lock was taken.</returns>
    public bool Lock(long pfn, CancellationToken cancellationToken)
    {
        if (TryLock(pfn))
            return true;
        return LockSlow(pfn, cancellationToken);
    }

    /// <summary>unlock_page: releases the lock and wakes sleepers, if any.</summary>
    /// <exception cref="VmBugException">the page was not locked.</exception>
    public void Unlock(long pfn)
    {
        ref ulong flags = ref FlagsOf(pfn);
        // Clearing PG_waiters with PG_locked is safe: every waiter we wake re-sets it before it
        // sleeps again (see the overview).
        ulong old = Interlocked.And(ref flags, ~(LockedBit | WaitersBit));
        if ((old & LockedBit) == 0)
            throw new VmBugException($"unlock_page of unlocked frame {pfn}");
        if ((old & WaitersBit) != 0)
            WakeWaiters(pfn);
    }

    /// <summary>PageLocked.</summary>
    public bool IsLocked(long pfn) => (Volatile.Read(ref FlagsOf(pfn)) & LockedBit) != 0;

    /// <summary>wait_on_page_locked: waits until the lock is free, without taking it.</summary>
    public void WaitUnlocked(long pfn)
    {
        ref ulong flags = ref FlagsOf(pfn);
        if ((Volatile.Read(ref flags) & LockedBit) == 0)
            return;
        object queue = QueueOf(pfn);
        lock (queue)
        {
            while ((Interlocked.Or(ref flags, WaitersBit) & LockedBit) != 0)
                Monitor.Wait(queue);
        }
    }

    /// <summary>
    /// migration_entry_wait_on_locked: sleeps once until the page is unlocked, without a reference.
    /// The caller holds a lock (the pte lock) under which the page is known to be locked and alive;
    /// PG_waiters is set while that holds, then <paramref name="releaseBeforeSleep"/> drops the
    /// caller's lock. After waking, the page is not touched again (it may be freed by then), so the
    /// caller must look again at whatever it was waiting for.
    /// </summary>
    public void WaitUnlockedOnce(long pfn, Action releaseBeforeSleep)
    {
        ref ulong flags = ref FlagsOf(pfn);
        object queue = QueueOf(pfn);
        bool released = false;
        try
        {
            lock (queue)
            {
                ulong old = Interlocked.Or(ref flags, WaitersBit);
                releaseBeforeSleep();
                released = true;
                // Why this is safe: an unlock after our Or sees PG_waiters and must take the queue's
                // monitor to wake us, which it gets only once Monitor.Wait has released it.
                if ((old & LockedBit) != 0)
                    Monitor.Wait(queue);
            }
        }
        finally
        {
            if (!released)
                releaseBeforeSleep();
        }
    }

    private bool LockSlow(long pfn, CancellationToken cancellationToken)
    {
        ref ulong flags = ref FlagsOf(pfn);
        // Short holds are the common case (a scanner's compare, a fault's PTE install): spin briefly
        // before paying for a sleep and a wake-up.
        var spinner = new SpinWait();
        for (int i = 0; i < SpinsBeforeSleep; i++)
        {
            if ((Volatile.Read(ref flags) & LockedBit) == 0 && TryLock(pfn))
                return true;
            spinner.SpinOnce(sleep1Threshold: -1);
        }

        object queue = QueueOf(pfn);
        using CancellationTokenRegistration registration = cancellationToken.CanBeCanceled
            ? cancellationToken.Register(static q => { lock (q!) Monitor.PulseAll(q); }, queue)
            : default;
        lock (queue)
        {
            while (true)
            {
                ulong old = Interlocked.Or(ref flags, WaitersBit);
                if ((old & LockedBit) == 0)
                {
                    if (TryLock(pfn))
                        return true;
                    continue;
                }
                if (cancellationToken.IsCancellationRequested)
                    return false;
                Monitor.Wait(queue);
            }
        }
    }

    private void WakeWaiters(long pfn)
    {
        object queue = QueueOf(pfn);
        lock (queue)
            Monitor.PulseAll(queue);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private ref ulong FlagsOf(long pfn) => ref _memMap[_memMap.CompoundHead(pfn)].Flags;

    private object QueueOf(long pfn)
    {
        // Fibonacci hashing spreads neighbouring frames over the table.
        ulong hash = (ulong)_memMap.CompoundHead(pfn) * 0x9E3779B97F4A7C15UL;
        return _waitTable[(int)(hash >> (64 - WaitTableBits))];
    }
}
