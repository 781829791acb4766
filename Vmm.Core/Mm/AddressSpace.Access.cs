// The user access path: Read, Write and Fill through virtual addresses, page by page.
//
// Locking: none on the fast path: an access section (TlbShootdown) is not a lock, and a thread inside one
// takes no lock, allocates nothing and never blocks. The slow path leaves the section and faults
// (AddressSpace.Fault.cs, mmap_lock for read).
//
// Each page is touched inside one access section (TlbShootdown): enter, translate through the
// per-thread software TLB (validated against the mm's generation) or a lock-free page walk, copy,
// leave. A translation that does not allow the access leaves the section and faults, holding no lock,
// then retries. A walk that fills the TLB sets the PTE's accessed bit, and for a write its dirty bit,
// as the hardware does.
//
// User space ends at TASK_SIZE. The page walk indexes with 9 bits per level and would ignore bits
// 47-63, so an address at or above TASK_SIZE (non-canonical ones included) must never reach it: an
// access that starts there faults with SEGV_MAPERR before any byte moves, and one that runs into
// TASK_SIZE faults there like at any unmapped page (the walk, FindPte and the fault handler all refuse
// such addresses), so the fault address is always the first byte that could not be accessed.
// A call into an exited process is the host's misuse (InvalidOperationException); an exit that begins
// while an access is under way is found by its next fault (SegmentationFault, SegvReason.Exited).
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;
using Vmm.Native;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    private const ulong UserPresent = Pte.PresentBit | Pte.UserBit;

    /// <summary>
    /// Translates <paramref name="va"/> for one access. Returns the frame's address, or null when the
    /// access must fault. Preconditions: inside an access section of <paramref name="context"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public byte* Translate(AccessContext context, ulong va, bool write)
    {
        LockAssert.InAccessSection(context);
        ulong vpn = va >> PageShift;
        ref TlbEntry entry = ref context.Tlb[(int)(vpn & (AccessContext.TlbEntries - 1))];
        long generation = Volatile.Read(ref Generation);
        if (entry.MmId == Id && entry.Vpn == vpn && entry.Generation == generation && (entry.Writable || !write))
            return (byte*)entry.Frame;
        return WalkAndFill(ref entry, va, write, generation);
    }

    private byte* WalkAndFill(ref TlbEntry entry, ulong va, bool write, long generation)
    {
        // The walk ignores bits 47-63: an address outside user space must never reach it.
        if (Exited || va >= TaskSize)
            return null;
        // VmProcess.Read<T> / Write<T> reach this without a call marker; Machine.Dispose's shootdown relies on
        // such a walk seeing the flag and translating nothing (see TryReadValue). A call already in flight
        // (it holds a marker) goes on to the end, since Dispose waits for it before freeing anything, but
        // caches nothing: an entry filled now would outlive the call and the arena. Translate read the
        // generation before this load of the flag, so an entry filled while the flag still read clear
        // holds a generation from before Dispose's bump, and is never used again.
        bool disposing = _machine.IsDisposed;
        if (disposing && !MachineCall.IsInside(_machine.Id))
            return null;
        ulong* slot = FindPte(va, out _);
        if (slot == null)
            return null;
        while (true)
        {
            ulong value = Volatile.Read(ref *slot);
            if ((value & UserPresent) != UserPresent || (write && (value & Pte.WriteBit) == 0))
                return null;
            ulong wanted = value | Pte.AccessedBit | (write ? Pte.DirtyBit : 0);
            if (wanted != value && Interlocked.CompareExchange(ref *slot, wanted, value) != value)
                continue; // the PTE changed under us: look again
            byte* frame = _machine.Arena.FrameAddress((long)((value & Pte.PfnMask) >> PageShift));
            if (disposing)
                return frame;
            entry.MmId = Id;
            entry.Vpn = va >> PageShift;
            entry.Generation = generation;
            entry.Frame = (nint)frame;
            // A read fill of a writable PTE does not set the dirty bit, so it must not allow writes.
            entry.Writable = write;
            return frame;
        }
    }

    /// <summary>Writes at least this long stream past the cache (non-temporal stores), as memcpy does for large copies.</summary>
    private const int NonTemporalWriteBytes = 256 * 1024;

    /// <summary>The most bytes one access section copies: a flush waits at most for a copy this long.</summary>
    private const int MaxRunBytes = 64 * 1024;

    /// <summary>
    /// Extends a copy that starts in <paramref name="frame"/> over the following virtual pages for as
    /// long as their frames follow in the arena (the allocator hands sequentially faulted pages
    /// neighbouring frames), up to <see cref="MaxRunBytes"/>. One large copy streams at full memory
    /// speed where page-sized pieces do not. Preconditions: inside an access section.
    /// </summary>
    private int ExtendRun(AccessContext context, byte* frame, ulong address, int chunk, int remaining, bool write)
    {
        LockAssert.InAccessSection(context);
        if (chunk >= remaining)
            return chunk;
        // Follow the PTEs of the next pages directly (the same PTE table, one slot after another)
        // instead of a TLB lookup and a four-level walk per page.
        ulong next = address + (ulong)chunk;
        ulong* slot = FindPte(next, out _);
        int run = chunk;
        byte* expected = frame + PageSize;
        ulong need = UserPresent | (write ? Pte.WriteBit : 0);
        while (slot != null && run < remaining && run < MaxRunBytes && next < TaskSize) // the run never leaves user space
        {
            ulong value = Volatile.Read(ref *slot);
            if ((value & need) != need || _machine.Arena.FrameAddress((long)((value & Pte.PfnMask) >> PageShift)) != expected)
                break;
            ulong wanted = value | Pte.AccessedBit | (write ? Pte.DirtyBit : 0);
            if (wanted != value && Interlocked.CompareExchange(ref *slot, wanted, value) != value)
                break; // changing under us: let the next round translate it properly
            run += (int)Math.Min(PageSize, (ulong)(remaining - run));
            expected += PageSize;
            next += PageSize;
            slot = (next & ((PageSize << 9) - 1)) == 0 ? FindPte(next, out _) : slot + 1;
        }
        return run;
    }

    /// <summary>Raises the exception a failed fault stands for, or returns to retry.</summary>
    private void FaultOrThrow(ulong va, bool write)
    {
        FaultResult result = TryHandleFault(va, write);
        if (result != FaultResult.Done)
            throw FaultException(va, write, result);
    }

    /// <summary>
    /// The exception for a failed fault: SegmentationFault for a bad address or access (and for an exit
    /// that began during the access), BusError for a poisoned page, InsufficientMemoryException when no
    /// frame could be had.
    /// </summary>
    public static Exception FaultException(ulong va, bool write, FaultResult result)
    {
        AccessKind kind = write ? AccessKind.Write : AccessKind.Read;
        return result switch
        {
            FaultResult.MapError => new SegmentationFault(va, kind, SegvReason.MapError),
            FaultResult.AccessError => new SegmentationFault(va, kind, SegvReason.AccessError),
            FaultResult.Exited => new SegmentationFault(va, kind, SegvReason.Exited),
            FaultResult.HwPoison => new BusError(va, kind),
            _ => OutOfFrames(va, kind),
        };
    }

    /// <summary>Out of frames at <paramref name="va"/>: the address rides in Data (<see cref="VmProcess.FaultAddressKey"/>).</summary>
    private static InsufficientMemoryException OutOfFrames(ulong va, AccessKind kind)
    {
        var e = new InsufficientMemoryException($"out of memory: the machine has no frame for a {kind.ToString().ToLowerInvariant()} fault at 0x{va:x}");
        e.Data[VmProcess.FaultAddressKey] = va;
        return e;
    }

    /// <summary>
    /// The entry check of a host access of <paramref name="length"/> bytes at <paramref name="va"/>: the
    /// process must not have exited (InvalidOperationException), and a non-empty range must start below
    /// TASK_SIZE, or SegmentationFault (SEGV_MAPERR) at <paramref name="va"/> before anything is touched.
    /// A range that starts below and runs into TASK_SIZE faults there, page by page, as at a hole.
    /// </summary>
    public void CheckUserRange(ulong va, ulong length, bool write)
    {
        ThrowIfExited();
        if (length != 0 && va >= TaskSize) // an empty range touches nothing: no fault, as memcpy of 0 bytes
            throw new SegmentationFault(va, write ? AccessKind.Write : AccessKind.Read, SegvReason.MapError);
    }

    /// <summary>A host call into an exited process is misuse: InvalidOperationException.</summary>
    public void ThrowIfExited()
    {
        if (Exited)
            throw new InvalidOperationException("the process has exited");
    }

    /// <summary>Copies from user memory at <paramref name="va"/> into <paramref name="destination"/>.</summary>
    public void Read(ulong va, Span<byte> destination)
    {
        CheckUserRange(va, (ulong)destination.Length, write: false);
        AccessContext context = AccessContext.Current;
        fixed (byte* dst = destination)
        {
            int done = 0;
            while (done < destination.Length)
            {
                ulong address = va + (ulong)done;
                int chunk = (int)Math.Min(PageSize - (address & PageMask), (ulong)(destination.Length - done));
                while (true)
                {
                    TlbShootdown.Enter(context);
                    try
                    {
                        byte* frame = Translate(context, address, write: false);
                        if (frame != null)
                        {
                            chunk = ExtendRun(context, frame, address, chunk, destination.Length - done, write: false);
                            Buffer.MemoryCopy(frame + (address & PageMask), dst + done, chunk, chunk);
                            break;
                        }
                    }
                    finally
                    {
                        TlbShootdown.Exit(context);
                    }
                    FaultOrThrow(address, write: false);
                }
                done += chunk;
            }
        }
    }

    /// <summary>Copies <paramref name="source"/> into user memory at <paramref name="va"/>.</summary>
    public void Write(ulong va, ReadOnlySpan<byte> source)
    {
        CheckUserRange(va, (ulong)source.Length, write: true);
        AccessContext context = AccessContext.Current;
        fixed (byte* src = source)
        {
            int done = 0;
            while (done < source.Length)
            {
                ulong address = va + (ulong)done;
                int chunk = (int)Math.Min(PageSize - (address & PageMask), (ulong)(source.Length - done));
                while (true)
                {
                    TlbShootdown.Enter(context);
                    try
                    {
                        byte* frame = Translate(context, address, write: true);
                        if (frame != null)
                        {
                            chunk = ExtendRun(context, frame, address, chunk, source.Length - done, write: true);
                            byte* target = frame + (address & PageMask);
                            if (source.Length >= NonTemporalWriteBytes && chunk >= (int)PageSize && ((nuint)target & 31) == 0 && (chunk & 63) == 0)
                                PageOps.CopyNonTemporal(target, src + done, (nuint)chunk);
                            else
                                Buffer.MemoryCopy(src + done, target, chunk, chunk);
                            break;
                        }
                    }
                    finally
                    {
                        TlbShootdown.Exit(context);
                    }
                    FaultOrThrow(address, write: true);
                }
                done += chunk;
            }
        }
    }

    /// <summary>Sets <paramref name="length"/> bytes at <paramref name="va"/> to <paramref name="value"/>.</summary>
    public void Fill(ulong va, ulong length, byte value)
    {
        if (va < TaskSize && length != 0 && length - 1 > ulong.MaxValue - va)
            throw new ArgumentOutOfRangeException(nameof(length), length, $"0x{va:x} + {length} wraps past 2^64");
        CheckUserRange(va, length, write: true);
        AccessContext context = AccessContext.Current;
        ulong done = 0;
        while (done < length)
        {
            ulong address = va + done;
            ulong chunk = Math.Min(PageSize - (address & PageMask), length - done);
            while (true)
            {
                TlbShootdown.Enter(context);
                try
                {
                    byte* frame = Translate(context, address, write: true);
                    if (frame != null)
                    {
                        new Span<byte>(frame + (address & PageMask), (int)chunk).Fill(value);
                        break;
                    }
                }
                finally
                {
                    TlbShootdown.Exit(context);
                }
                FaultOrThrow(address, write: true);
            }
            done += chunk;
        }
    }

    /// <summary>
    /// Reads one unmanaged value (it may straddle a page boundary) through the span path, which faults:
    /// for a caller whose <see cref="TryReadValue"/> failed (no second fast attempt).
    /// </summary>
    public T ReadValueSlow<T>(ulong va) where T : unmanaged
    {
        T value = default;
        Read(va, new Span<byte>(&value, sizeof(T)));
        return value;
    }

    /// <summary>
    /// The fast path of one value inside one page: one access section, a translation that needs no fault.
    /// False (nothing read) when it would straddle a page or must fault, and when the machine is being
    /// disposed. Safe without a machine call marker (the host's Read&lt;T&gt; runs it before taking one):
    /// Machine.Dispose bumps every address space's generation and flushes before it frees anything, so a
    /// section begun before that is waited for, and one begun after misses its TLB and the walk sees the flag.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryReadValue<T>(ulong va, out T value) where T : unmanaged
    {
        if ((va & PageMask) <= PageSize - (ulong)sizeof(T))
        {
            // No try/finally: nothing between Enter and Exit can throw (the walk only reads).
            AccessContext context = AccessContext.Current;
            TlbShootdown.Enter(context);
            byte* frame = Translate(context, va, write: false);
            if (frame != null)
            {
                value = Unsafe.ReadUnaligned<T>(frame + (va & PageMask));
                TlbShootdown.Exit(context);
                return true;
            }
            TlbShootdown.Exit(context);
        }
        value = default;
        return false;
    }

    /// <summary>Writes one unmanaged value through the span path, which faults: the slow path of <see cref="TryWriteValue"/>.</summary>
    public void WriteValueSlow<T>(ulong va, T value) where T : unmanaged => Write(va, new ReadOnlySpan<byte>(&value, sizeof(T)));

    /// <summary>The fast path of a one-value write; the rules of <see cref="TryReadValue"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryWriteValue<T>(ulong va, T value) where T : unmanaged
    {
        if ((va & PageMask) <= PageSize - (ulong)sizeof(T))
        {
            AccessContext context = AccessContext.Current;
            TlbShootdown.Enter(context);
            byte* frame = Translate(context, va, write: true);
            if (frame != null)
            {
                Unsafe.WriteUnaligned(frame + (va & PageMask), value);
                TlbShootdown.Exit(context);
                return true;
            }
            TlbShootdown.Exit(context);
        }
        return false;
    }
}
