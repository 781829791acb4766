// MachineCall: the lifetime guard of every public call into a Machine, and the rule that lets
// Machine.Dispose unmap the arena only when no thread can touch it.
//
// Every public member that reaches the machine's native memory (the arena, the frame descriptors) or its
// structures opens a MachineCall first: `using var call = machine.EnterCall();`. Entering writes the
// machine's id into the calling thread's call marker (a field of the thread's slot in TlbShootdown's
// pinned slot array, beside its access-section epoch) with a plain store, then reads the machine's
// disposed flag: set, it clears the marker and throws ObjectDisposedException naming the machine.
// Leaving clears the marker.
//
// Dispose sets the flag, issues Interlocked.MemoryBarrierProcessWide, stops the machine's own threads
// and then waits until no slot's marker names the machine. The argument is the TLB flush's (see
// TlbShootdown.cs): the barrier makes every other thread execute a full fence, so either an entering
// thread's marker store is visible to the disposer (which waits for the thread to leave), or the
// thread's later load of the flag comes after the fence and sees it set (the thread throws without
// touching anything). Why not a shared counter of calls in flight: an Interlocked on one cache line
// per Read<T> would cost more than the read itself under contention; the plain store goes to the
// thread's own cache line, and the disposer, which runs once, pays for the barrier.
//
// Nesting. A public call that calls another public call of the same machine (DedupeStore -> VmProcess,
// GetVmStats -> Ksm.GetStats) finds its machine already in the marker and leaves it alone: the guard
// remembers that it entered nothing, so the outer call's marker stays until the outer call leaves.
// A thread inside one machine that calls into a second (Vmm never does; a host could only do it from
// code Vmm calls, and Vmm calls no host code today) uses the second field, Inner. A third distinct
// machine at once is refused with InvalidOperationException: two fields keep the disposer's scan a
// pair of loads per thread, and nothing in Vmm needs more.
//
// Dispose from a thread that is itself inside the machine would wait for itself: it throws
// InvalidOperationException instead.
//
// Locking: a call is not a lock, and it is ordered above every lock (docs/locking.md): a thread inside
// one may block, fault and take any lock. The marker is the thread's own; only the disposer reads others'.
using System.Runtime.CompilerServices;
using Vmm.Mm;

namespace Vmm;

/// <summary>
/// A thread's stay inside one machine (see the file overview). Dispose it (a <c>using</c>) to leave.
/// Default (entered nothing) for a nested call of the same machine.
/// </summary>
internal readonly unsafe ref struct MachineCall
{
    private readonly long* _marker; // the marker this call set, or null if it set none (nested)

    private MachineCall(long* marker) => _marker = marker;

    /// <summary>
    /// Enters <paramref name="machineId"/>'s calls, or returns false (entering nothing) if
    /// <paramref name="isDisposed"/> reads true after the marker is published.
    /// </summary>
    /// <exception cref="InvalidOperationException">the thread is already inside two other machines.</exception>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static bool TryEnter(long machineId, ref int isDisposed, out MachineCall call)
    {
        long* markers = AccessContext.Current.Calls;
        long* marker;
        if (markers[0] == machineId || markers[1] == machineId)
        {
            // Nested: the outer call's marker already keeps the disposer waiting, and it saw the flag clear.
            call = default;
            return true;
        }
        if (markers[0] == 0)
            marker = markers;
        else if (markers[1] == 0)
            marker = markers + 1;
        else
            throw new InvalidOperationException("a thread may be inside at most two machines at once");
        // A plain store, then the load of the flag: ordered by the disposer's process-wide barrier.
        Volatile.Write(ref *marker, machineId);
        if (Volatile.Read(ref isDisposed) != 0)
        {
            Volatile.Write(ref *marker, 0);
            call = default;
            return false;
        }
        call = new MachineCall(marker);
        return true;
    }

    /// <summary>True if the calling thread is inside a call of <paramref name="machineId"/>.</summary>
    internal static bool IsInside(long machineId)
    {
        AccessContext? context = AccessContext.CurrentOrNull;
        return context is not null && (context.Calls[0] == machineId || context.Calls[1] == machineId);
    }

    /// <summary>Leaves the call (nothing for a nested one).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Dispose()
    {
        if (_marker != null)
            Volatile.Write(ref *_marker, 0);
    }
}
