// LockAssert: the lock preconditions of docs/locking.md, checked in Debug builds (Linux's
// lockdep_assert_held, VM_BUG_ON_PAGE(!PageLocked(page)); Tsavorite's Debug.Assert(..., "requires ...")).
//
// Every method that expects a lock held ends in `Locked` or lists the lock in a `Preconditions:` line of
// its doc comment; its first statements call one of these helpers, which name the method (through
// CallerMemberName) and the lock in the failure: "RmqueueSmallestLocked requires the zone lock held".
//
// Release builds pay nothing: every helper is [Conditional("DEBUG")], so the compiler drops the call and
// the evaluation of its arguments at each call site of a Release build of Vmm.Core (the helpers stay in
// the assembly, unused). The owner words of the spin locks (PerCpuPages.Lock, the pte lock) are written
// with the owner's managed thread id only under #if DEBUG, and store 1 in Release as before.
//
// A failure throws VmBugException instead of calling Debug.Assert. Why: on .NET a failed Debug.Assert
// goes to the trace listeners, and the DefaultTraceListener ends the process with FailFast (or breaks
// into a debugger), so under `dotnet test` one broken precondition would kill the test host and hide
// which test broke it, while an exception fails that test with its stack. On ksmd's thread the scan
// loop catches it into Ksm.Failure and stops ksmd (tests that run ksmd check Failure); an exception
// that escapes any other background thread ends the process, loudly, as a bug should.
//
// What cannot be checked cheaply is said where it is asserted: "no other thread can reach the frames"
// (an ownership argument, not a lock), and which page locks a thread holds (PG_locked has no owner, as
// in Linux: a check can only say that some thread holds it).
using System.Diagnostics;
using System.Runtime.CompilerServices;
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Diagnostics;

/// <summary>Debug-only checks of lock preconditions (lockdep_assert_held and friends).</summary>
internal static class LockAssert
{
    /// <summary>lockdep_assert_held for a <see cref="Lock"/> (zone lock, page_table_lock, mm-list lock, ...).</summary>
    [Conditional("DEBUG")]
    public static void Held(Lock lockObject, string lockName, [CallerMemberName] string caller = "")
    {
        if (!lockObject.IsHeldByCurrentThread)
            Fail(caller, lockName + " held");
    }

    /// <summary>lockdep_assert_held for a monitor (anon_vma lock, shmem object lock, ksm_thread_mutex).</summary>
    [Conditional("DEBUG")]
    public static void Held(object monitor, string lockName, [CallerMemberName] string caller = "")
    {
        if (!Monitor.IsEntered(monitor))
            Fail(caller, lockName + " held");
    }

    /// <summary>lockdep_assert_not_held for a monitor: the caller must not hold it (it would deadlock or break the lock order).</summary>
    [Conditional("DEBUG")]
    public static void NotHeld(object monitor, string lockName, [CallerMemberName] string caller = "")
    {
        if (Monitor.IsEntered(monitor))
            Fail(caller, lockName + " not held");
    }

    /// <summary>mmap_assert_locked / mmap_assert_write_locked: the mm's mmap_lock held by this thread (for write if asked).</summary>
    [Conditional("DEBUG")]
    public static void MmapLockHeld(AddressSpace mm, bool write = false, [CallerMemberName] string caller = "")
    {
        ReaderWriterLockSlim mmapLock = mm.MmapLock;
        if (write ? !mmapLock.IsWriteLockHeld
                  : !(mmapLock.IsReadLockHeld || mmapLock.IsWriteLockHeld || mmapLock.IsUpgradeableReadLockHeld))
            Fail(caller, write ? "the mmap_lock held for write" : "the mmap_lock held");
    }

    /// <summary>The mm's mmap_lock not held by this thread (in any mode).</summary>
    [Conditional("DEBUG")]
    public static void MmapLockNotHeld(AddressSpace mm, [CallerMemberName] string caller = "")
    {
        ReaderWriterLockSlim mmapLock = mm.MmapLock;
        if (mmapLock.IsReadLockHeld || mmapLock.IsWriteLockHeld || mmapLock.IsUpgradeableReadLockHeld)
            Fail(caller, "the mmap_lock of " + mm + " not held");
    }

    /// <summary>VM_BUG_ON_PAGE(!PageLocked(page)): PG_locked set (by some thread: the page lock has no owner).</summary>
    [Conditional("DEBUG")]
    public static void PageLocked(PageLock pageLock, long pfn, [CallerMemberName] string caller = "")
    {
        if (!pageLock.IsLocked(pfn))
            Fail(caller, $"the page lock of frame {pfn} held");
    }

    /// <summary>The caller holds a reference to the page: its refcount is above zero.</summary>
    [Conditional("DEBUG")]
    public static void Referenced(MemMap memMap, long pfn, [CallerMemberName] string caller = "")
    {
        if (memMap.RefCount(pfn) <= 0)
            Fail(caller, $"a reference to frame {pfn} (its refcount is {memMap.RefCount(pfn)})");
    }

    /// <summary>Inside an access section of <paramref name="context"/> (TlbShootdown.Enter without Exit).</summary>
    [Conditional("DEBUG")]
    public static unsafe void InAccessSection(AccessContext context, [CallerMemberName] string caller = "")
    {
        if (Volatile.Read(ref *context.Epoch) == 0)
            Fail(caller, "an access section entered");
    }

    /// <summary>Not inside an access section of <paramref name="context"/>.</summary>
    [Conditional("DEBUG")]
    public static unsafe void NotInAccessSection(AccessContext context, [CallerMemberName] string caller = "")
    {
        if (Volatile.Read(ref *context.Epoch) != 0)
            Fail(caller, "no access section entered");
    }

    /// <summary>The pcp spin word of <paramref name="pcp"/> held by this thread.</summary>
    [Conditional("DEBUG")]
    public static void PcpLockHeld(PerCpuPages pcp, [CallerMemberName] string caller = "")
    {
#if DEBUG
        if (!pcp.IsHeldByCurrentThread)
            Fail(caller, "the pcp lock held");
#endif
    }

    /// <summary>The spin word of an LRU add batch held by this thread.</summary>
    [Conditional("DEBUG")]
    public static void LruBatchLockHeld(LruAddBatch batch, [CallerMemberName] string caller = "")
    {
#if DEBUG
        if (!batch.IsHeldByCurrentThread)
            Fail(caller, "the LRU add-batch spin word held");
#endif
    }

    /// <summary>The pte lock of the PTE table <paramref name="ptePfn"/> held by this thread.</summary>
    [Conditional("DEBUG")]
    public static void PteLockHeld(AddressSpace mm, long ptePfn, [CallerMemberName] string caller = "")
    {
#if DEBUG
        if (!mm.IsPteLockHeldByCurrentThread(ptePfn))
            Fail(caller, $"the pte lock of table frame {ptePfn} held");
#endif
    }

    /// <summary>A precondition that is not a lock (a state the caller must have established).</summary>
    [Conditional("DEBUG")]
    public static void That(bool condition, string requirement, [CallerMemberName] string caller = "")
    {
        if (!condition)
            Fail(caller, requirement);
    }

    private static void Fail(string caller, string requirement) =>
        throw new VmBugException($"{caller} requires {requirement}");
}
