using Vmm.Mm;

namespace Vmm.Tests.Robustness;

/// <summary>
/// The one list of how a public call may fail, shared by the fault-injection sweep and the API fuzzer.
/// Anything a call throws or returns that is not here is a defect. When a documented exception changes
/// (issue 9 unifies the out-of-memory type and the argument errors), change it here only.
/// Entries marked "fixed on branch addr" / "fixed on branch lifetime" accept today's behaviour, which
/// those branches replace; the lead tightens them after merging.
/// </summary>
internal static class DocumentedFailures
{
    /// <summary>Errnos a syscall-shaped call returns when memory runs out (ENOMEM; EAGAIN from madvise(UNMERGEABLE)'s unmerge, as Linux's break_ksm).</summary>
    public static readonly Errno[] OutOfMemoryErrnos = [Errno.ENOMEM, Errno.EAGAIN];

    /// <summary>
    /// The documented out-of-memory exceptions: a fault that found no frame (SIGBUS-like
    /// SegmentationFault with reason OutOfMemory: Read, Write, Fill, Pin), and InsufficientMemoryException
    /// (Fork, the throwing Mmap overload, DedupeStore.Create, VmmBuffer.Write / Pin).
    /// </summary>
    public static bool IsOutOfMemory(Exception e) => e switch
    {
        SegmentationFault { Reason: SegvReason.OutOfMemory } => true,
        InsufficientMemoryException => true,
        _ => false,
    };

    /// <summary>
    /// What a public call may throw for hostile arguments or misuse (not for lack of memory): a bad user
    /// access, an argument error, a use after exit or dispose.
    /// </summary>
    public static bool IsDocumentedMisuse(Exception e) => e switch
    {
        SegmentationFault => true,            // bad address, protection, exited process (SegvReason.Exited)
        ArgumentException => true,            // ArgumentOutOfRangeException, ArgumentNullException: bad length, offset, knob, node
        ObjectDisposedException => true,      // disposed buffer, store, pin, machine
        InvalidOperationException => true,    // an exited process (Fork), a store without KSM
        // The throwing Mmap(length) overload says InsufficientMemoryException for any mmap error,
        // EINVAL included. fixed on branch addr (an argument error becomes an ArgumentException).
        InsufficientMemoryException => true,
        _ => false,
    };

    /// <summary>
    /// Today's defects that another branch fixes, accepted per call until the lead merges that branch and
    /// deletes the entry. <paramref name="api"/> is the call's name (VmProcess.Pin is "Pin").
    /// </summary>
    /// <remarks>Defects that would corrupt state (not only throw the wrong type) are steered around instead: KnownDefects in ApiFuzzTests.cs.</remarks>
    public static bool IsKnownDefect(string api, Exception e) => (api, e) switch
    {
        // Pin of a length near 2^62: its frame array is sized before the range is validated.
        // fixed on branch addr (issue 9, part 3: Pin validates before allocating).
        ("Pin", OutOfMemoryException or OverflowException) => true,
        _ => false,
    };

    /// <summary>True for what no public call may ever throw, whatever its arguments: a bug in Vmm.</summary>
    public static bool IsNeverAcceptable(Exception e) =>
        e is VmBugException or NullReferenceException or IndexOutOfRangeException or AccessViolationException
            or AggregateException or NotImplementedException;
}
