// TlbShootdown: the access protocol that replaces the hardware TLB flush.
// Locking: none; a section is a published epoch, the flush a barrier and a wait (docs/locking.md:
// sections are ordered below every lock, machine calls above).
//
// The rule every mechanism relies on: once a PTE change has been flushed, no thread still reads or
// writes the frame through the old translation.
//
// Every user access runs inside a short access section, one page at a time: the thread publishes the
// global epoch in its own cache-line slot, translates (software TLB or page walk), copies, and clears
// the slot. A mechanism that changes PTEs then calls Flush(): it advances the global epoch, issues a
// process-wide memory barrier, and waits until every slot is either empty or holds the new epoch. Any
// thread that was inside a section begun before the change has left it; any thread that enters after
// it sees the change (the software TLB is validated against the mm's generation, which the changer
// bumped before flushing).
//
// Why the process-wide barrier (membarrier on Linux) and not a fence in every section: on x86 a store
// (publishing the slot) may be reordered after a later load (reading the PTE). A full fence per access
// would cost more than the access itself. Interlocked.MemoryBarrierProcessWide makes every other thread
// execute a full barrier before it returns, so either the reader's slot store is visible to the flusher
// (and the flusher waits for it), or the reader's loads come after the barrier and see the new PTE and
// the new generation. The cost moves to the flusher, which is rare and batched.
//
// The per-machine side of a flush, the references that may be dropped only after it (deferred puts),
// lives beside this file in TlbFlusher.cs (Machine.Tlb).
//
// Sections never block: a thread that must fault, lock or allocate leaves its section first. A thread
// must never call Flush from inside a section (it would wait for itself).
//
// The same slot also holds the thread's machine call markers (MachineCall.cs): which machine's public
// call the thread is inside, so that Machine.Dispose can wait for every caller to leave with the same
// barrier-then-scan argument. Calls, unlike sections, may block.
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Vmm.Diagnostics;

namespace Vmm.Mm;

/// <summary>Access sections and the flush that waits for them. Process-wide: one slot per thread.</summary>
internal static class TlbShootdown
{
    private const int MaxSlots = 1024;

    [StructLayout(LayoutKind.Explicit, Size = 64)]
    private struct Slot
    {
        [FieldOffset(0)] public long Epoch;   // 0 outside a section; else the global epoch at entry
        [FieldOffset(8)] public int InUse;    // 1 while a live thread owns the slot
        [FieldOffset(16)] public long Outer;  // machine call marker: the id of the machine this thread is inside, or 0
        [FieldOffset(24)] public long Inner;  // a second machine entered while inside Outer (see MachineCall)
    }

    // Pinned, so that each thread's context can keep a raw pointer to its slot (no bounds check on the hot path).
    private static readonly Slot[] Slots = GC.AllocateArray<Slot>(MaxSlots, pinned: true);
    private static int _highWater;           // slots [0, _highWater) have ever been handed out
    private static long _globalEpoch = 1;
    private static long _flushes;

    /// <summary>How many flushes have run (for tests and statistics).</summary>
    public static long Flushes => Volatile.Read(ref _flushes);

    /// <summary>Enters an access section. Preconditions: not already inside one.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static unsafe void Enter(AccessContext context)
    {
        LockAssert.NotInAccessSection(context);
        // A plain store: ordering against the loads that follow is provided by the flusher's
        // process-wide barrier (see the overview).
        Volatile.Write(ref *context.Epoch, Volatile.Read(ref _globalEpoch));
    }

    /// <summary>Leaves the access section.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static unsafe void Exit(AccessContext context) => Volatile.Write(ref *context.Epoch, 0);

    internal static unsafe long* EpochSlot(int slot) => (long*)Unsafe.AsPointer(ref Slots[slot].Epoch);

    internal static unsafe long* CallSlots(int slot) => (long*)Unsafe.AsPointer(ref Slots[slot].Outer);

    /// <summary>
    /// Machine.Dispose's wait: returns once no thread's call marker names <paramref name="machineId"/>.
    /// Preconditions: the machine's disposed flag is set, and the caller has issued the process-wide
    /// barrier after setting it (see MachineCall), so that every thread that enters later sees the flag.
    /// </summary>
    public static void WaitForMachineCalls(long machineId)
    {
        // The preconditions are not checked here: the flag and the barrier are the caller's
        // (Machine.Dispose, the one caller), and nothing here knows the machine.
        int count = Volatile.Read(ref _highWater);
        for (int i = 0; i < count; i++)
        {
            ref Slot slot = ref Slots[i];
            var spinner = new SpinWait();
            while (Volatile.Read(ref slot.Outer) == machineId || Volatile.Read(ref slot.Inner) == machineId)
                spinner.SpinOnce(); // calls are short; a long one (a full scan) yields the CPU through SpinOnce's sleeps
        }
    }

    /// <summary>
    /// The shootdown: returns once no thread can still be using a translation that existed before the
    /// call. Callers change the PTEs (and bump the mm's generation) first. Preconditions: the caller is
    /// not inside an access section.
    /// </summary>
    public static void Flush()
    {
        AccessContext? own = AccessContext.CurrentOrNull;
        if (own is not null && Volatile.Read(ref Slots[own.Slot].Epoch) != 0)
            throw new VmBugException("TLB flush from inside an access section would wait for itself");
        long target = Interlocked.Increment(ref _globalEpoch);
        Interlocked.MemoryBarrierProcessWide();
        int count = Volatile.Read(ref _highWater);
        for (int i = 0; i < count; i++)
        {
            ref long epoch = ref Slots[i].Epoch;
            long seen = Volatile.Read(ref epoch);
            if (seen == 0 || seen >= target)
                continue;
            var spinner = new SpinWait();
            while ((seen = Volatile.Read(ref epoch)) != 0 && seen < target)
                spinner.SpinOnce();
        }
        Interlocked.Increment(ref _flushes);
    }

    internal static int AllocateSlot()
    {
        while (true)
        {
            int count = Volatile.Read(ref _highWater);
            for (int i = 0; i < count; i++)
            {
                if (Interlocked.CompareExchange(ref Slots[i].InUse, 1, 0) == 0)
                    return i;
            }
            if (count >= MaxSlots)
                throw new InvalidOperationException($"more than {MaxSlots} threads access Vmm memory at once");
            if (Interlocked.CompareExchange(ref Slots[count].InUse, 1, 0) == 0)
            {
                Interlocked.CompareExchange(ref _highWater, count + 1, count);
                // Another thread may have taken slot count - 1 and not raised the mark yet; raise it to at least ours.
                int mark;
                while ((mark = Volatile.Read(ref _highWater)) < count + 1)
                    Interlocked.CompareExchange(ref _highWater, count + 1, mark);
                return count;
            }
        }
    }

    internal static void ReleaseSlot(int slot)
    {
        Volatile.Write(ref Slots[slot].Epoch, 0);
        Volatile.Write(ref Slots[slot].Outer, 0);
        Volatile.Write(ref Slots[slot].Inner, 0);
        Volatile.Write(ref Slots[slot].InUse, 0);
    }
}

/// <summary>One entry of the per-thread software TLB (direct mapped).</summary>
internal struct TlbEntry
{
    public long MmId;          // 0: empty
    public ulong Vpn;          // virtual page number
    public long Generation;    // the mm's generation when filled; stale once it moves on
    public nint Frame;         // address of the frame in the arena
    public bool Writable;      // filled for a write: the PTE was writable and is now dirty
}

/// <summary>Per-thread state of the access path: the epoch slot and the software TLB.</summary>
internal sealed unsafe class AccessContext
{
    public const int TlbEntries = 64;

    [ThreadStatic] private static AccessContext? t_current;

    // -1 until AllocateSlot succeeds. Why: a finalizable object whose constructor throws (every slot taken,
    // or out of memory for Tlb) is still finalized, and a finalizer that released a default 0 freed slot 0,
    // another live thread's call markers and epoch: Machine.Dispose and Flush would stop waiting for it.
    public readonly int Slot = -1;
    public readonly long* Epoch; // this thread's slot in the pinned slot array
    public readonly long* Calls; // this thread's machine call markers: [0] outer, [1] inner (see MachineCall)
    public readonly TlbEntry[] Tlb = new TlbEntry[TlbEntries];

    private AccessContext()
    {
        Slot = TlbShootdown.AllocateSlot();
        Epoch = TlbShootdown.EpochSlot(Slot);
        Calls = TlbShootdown.CallSlots(Slot);
    }

    /// <summary>The calling thread's context, created on first use.</summary>
    public static AccessContext Current
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => t_current ?? Create();
    }

    public static AccessContext? CurrentOrNull => t_current;

    private static AccessContext Create() => t_current = new AccessContext();

    // The thread-static reference dies with its thread; the finalizer then gives the slot back.
    ~AccessContext()
    {
        if (Slot >= 0) // never constructed (see Slot): it owns no slot
            TlbShootdown.ReleaseSlot(Slot);
    }
}
