using Vmm.Mm;

namespace Vmm.Tests.Robustness;

/// <summary>
/// The one list of how a public call may fail, shared by the fault-injection sweep and the API fuzzer.
/// Anything a call throws or returns that is not here is a defect. When a documented exception changes,
/// change it here only. (Issue 9's branches are merged: out of frames is InsufficientMemoryException on
/// every throwing path, an exited process is InvalidOperationException, argument errors are
/// ArgumentException; nothing here accepts the defects those branches fixed.)
/// </summary>
internal static class DocumentedFailures
{
    /// <summary>Errnos a syscall-shaped call returns when memory runs out (ENOMEM; EAGAIN from madvise(UNMERGEABLE)'s unmerge, as Linux's break_ksm).</summary>
    public static readonly Errno[] OutOfMemoryErrnos = [Errno.ENOMEM, Errno.EAGAIN];

    /// <summary>
    /// The documented out-of-memory exception of every throwing path: InsufficientMemoryException (Read,
    /// Write, Read&lt;T&gt; / Write&lt;T&gt;, Fill, Pin, Fork, the throwing Mmap overload, DedupeStore,
    /// VmmBuffer). SegvReason.OutOfMemory is never raised any more: a SegmentationFault is never out of memory.
    /// </summary>
    public static bool IsOutOfMemory(Exception e) => e is InsufficientMemoryException;

    /// <summary>
    /// What a public call may throw for hostile arguments or misuse (not for lack of memory): a bad user
    /// access, an argument error, a use after exit or dispose.
    /// </summary>
    public static bool IsDocumentedMisuse(Exception e) => e switch
    {
        SegmentationFault { Reason: SegvReason.OutOfMemory } => false, // out of frames is InsufficientMemoryException
        SegmentationFault => true,            // bad address or protection (MapError / AccessError); Exited only when another thread exits the process during the access
        ArgumentException => true,            // ArgumentOutOfRangeException, ArgumentNullException: bad length, offset, knob, node
        ObjectDisposedException => true,      // disposed buffer, store, pin, machine
        InvalidOperationException => true,    // an exited process (the throwing API), a store without KSM
        _ => false,
    };

    /// <summary>True for what no public call may ever throw, whatever its arguments: a bug in Vmm.</summary>
    public static bool IsNeverAcceptable(Exception e) =>
        e is VmBugException or NullReferenceException or IndexOutOfRangeException or AccessViolationException
            or AggregateException or NotImplementedException or OverflowException
            || (e is OutOfMemoryException && e is not InsufficientMemoryException);
}
