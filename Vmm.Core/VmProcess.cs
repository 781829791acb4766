// Process: a managed "process" whose memory is real: its address space maps virtual ranges onto the
// machine's frames. The host reads and writes it through virtual addresses; a bad access throws
// SegmentationFault. Syscall-shaped calls return Linux's errno and never throw for an expected failure.
using Vmm.Mm;

namespace Vmm;

/// <summary>A process of a <see cref="Machine"/>: credentials, a home node and an address space.</summary>
/// <remarks>
/// Thread safety and lifetime: every member may be called from any thread at once, as the threads of a
/// Linux process share one mm: reads and writes from different threads run in parallel (concurrent
/// writes to the same bytes race as they would in real memory), while mmap, munmap, mprotect, madvise
/// and fork serialize on the process's mmap_lock. A process lives until Exit (idempotent) or until its
/// machine is disposed. After Exit, the throwing API (Read, Write, Fill, Pin, GetPagemap, Fork) throws
/// <see cref="InvalidOperationException"/> ("process N has exited"), and the syscall-shaped calls keep
/// returning their errno (Mmap is ENOMEM: an exited mm maps nothing); a call racing with Exit on
/// another thread may instead fail the way Exit's teardown finds it, as a SegmentationFault with
/// SegvReason.Exited. After the machine's Dispose every member except the identity ones (Machine, Pid,
/// Credentials, HomeNode, HasExited) throws <see cref="ObjectDisposedException"/>, and Exit is a no-op.
/// Pins taken from a process outlive its Exit (they hold their frames) but not its machine.
/// </remarks>
public sealed class VmProcess
{
    internal VmProcess(Machine machine, int pid, Credentials credentials, AddressSpace mm)
    {
        Machine = machine;
        Pid = pid;
        Credentials = credentials;
        Mm = mm;
    }

    /// <summary>The machine it runs on.</summary>
    public Machine Machine { get; }

    /// <summary>VmProcess id, unique per machine.</summary>
    public int Pid { get; }

    /// <summary>Who it runs as.</summary>
    public Credentials Credentials { get; }

    /// <summary>The node its new pages are allocated on first.</summary>
    public int HomeNode => Mm.HomeNode;

    /// <summary>True once <see cref="Exit"/> has run.</summary>
    public bool HasExited => Mm.Exited;

    internal AddressSpace Mm { get; }

    /// <summary>Private anonymous pages mapped (RssAnon).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long RssAnonPages
    {
        get
        {
            using MachineCall call = Machine.EnterCall();
            return Volatile.Read(ref Mm.RssAnon);
        }
    }

    /// <summary>Shared anonymous pages mapped (RssShmem).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long RssShmemPages
    {
        get
        {
            using MachineCall call = Machine.EnterCall();
            return Volatile.Read(ref Mm.RssShmem);
        }
    }

    /// <summary>Page-table frames (VmPTE / 4 KiB).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long PageTablePages
    {
        get
        {
            using MachineCall call = Machine.EnterCall();
            return Volatile.Read(ref Mm.PageTablePages);
        }
    }

    /// <summary>
    /// mmap of anonymous memory. EINVAL: zero length, neither Private nor Shared, unknown protection
    /// bits, a misaligned fixed address; EPERM: a fixed address below mmap_min_addr (64 KiB); ENOMEM: a
    /// length that overflows when rounded to pages, no room, or a fixed range outside user space;
    /// EEXIST: FixedNoReplace over a mapping; EOPNOTSUPP: an unknown flag with SharedValidate (without
    /// it, unknown flags are ignored, as in Linux). A hint is rounded up to a page and used if free.
    /// </summary>
    /// <param name="address">with Fixed / FixedNoReplace, the address; otherwise a hint (0: anywhere).</param>
    /// <param name="length">bytes; rounded up to whole pages.</param>
    /// <param name="protection">PROT_* bits.</param>
    /// <param name="flags">Private or Shared, plus Fixed, FixedNoReplace, Populate.</param>
    /// <param name="mapped">the start of the new mapping.</param>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Mmap(ulong address, ulong length, Protection protection, MapFlags flags, out ulong mapped)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Mmap(address, length, protection, flags, out mapped);
    }

    /// <summary>Maps <paramref name="length"/> bytes of private read-write memory anywhere; throws if that fails.</summary>
    /// <exception cref="InsufficientMemoryException">no room in the address space.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public ulong Mmap(ulong length, Protection protection = Protection.ReadWrite, MapFlags flags = MapFlags.Private)
    {
        using MachineCall call = Machine.EnterCall();
        Errno error = Mm.Mmap(0, length, protection, flags, out ulong mapped);
        return error == Errno.None ? mapped : throw new InsufficientMemoryException($"mmap of {length} bytes failed: {error}");
    }

    /// <summary>munmap. EINVAL: misaligned start, zero or overflowing length. Unmapped parts are fine.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Munmap(ulong address, ulong length)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Munmap(address, length);
    }

    /// <summary>mprotect. EINVAL: misaligned start or unknown bits; ENOMEM: overflow or an unmapped part.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Mprotect(ulong address, ulong length, Protection protection)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Mprotect(address, length, protection);
    }

    /// <summary>madvise. EINVAL: misaligned start, overflowing length, unknown advice; ENOMEM: part of the range unmapped.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Madvise(ulong address, ulong length, Advice advice)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Madvise(address, length, advice);
    }

    /// <summary>
    /// prctl(PR_SET_MEMORY_MERGE): merge every private mapping of the process, present and future (KSM's
    /// process-wide mode; inherited by fork). Disabling unmerges everything first. EINVAL when the machine
    /// has no KSM; ENOMEM if unmerging ran out of memory (merging then stays on).
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetMemoryMerge(bool enable)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.SetMemoryMerge(enable);
    }

    /// <summary>prctl(PR_GET_MEMORY_MERGE): whether process-wide merging is on.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public bool IsMemoryMergeEnabled
    {
        get
        {
            using MachineCall call = Machine.EnterCall();
            return Mm.KsmMergeAny;
        }
    }

    /// <summary>
    /// Puts a range in a dedupe domain: KSM merges pages only within one domain (default 0 for
    /// everything), and the index is keyed per domain, so one domain cannot learn another's contents
    /// by merging with them. Pages merged under the old domain are unmerged first. EINVAL: misaligned
    /// or overflowing range; ENOMEM: part of the range unmapped (the mapped part still changes).
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetDedupeDomain(ulong address, ulong length, ushort domain)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.SetDedupeDomain(address, length, domain, wholeProcess: false);
    }

    /// <summary>Puts the whole process, and every mapping it makes later, in dedupe domain <paramref name="domain"/>.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetDedupeDomain(ushort domain)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.SetDedupeDomain(0, 0, domain, wholeProcess: true);
    }

    /// <summary>The process's KSM counters (/proc/pid/ksm_stat); all zero when the machine has no KSM.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public ProcessKsmStats GetKsmStats()
    {
        using MachineCall call = Machine.EnterCall();
        return Machine.Ksm is null ? new ProcessKsmStats(0, 0, 0, 0, false, false) : Ksm.GetProcessStats(Mm);
    }

    /// <summary>Reads user memory.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not readable.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Read(ulong address, Span<byte> destination)
    {
        using MachineCall call = EnterLiveCall();
        Mm.Read(address, destination);
    }

    /// <summary>Writes user memory.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Write(ulong address, ReadOnlySpan<byte> source)
    {
        using MachineCall call = EnterLiveCall();
        Mm.Write(address, source);
    }

    /// <summary>Reads one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not readable.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public T Read<T>(ulong address) where T : unmanaged
    {
        using MachineCall call = EnterLiveCall();
        return Mm.ReadValue<T>(address);
    }

    /// <summary>Writes one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not writable.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Write<T>(ulong address, T value) where T : unmanaged
    {
        using MachineCall call = EnterLiveCall();
        Mm.WriteValue(address, value);
    }

    /// <summary>Sets a range of user memory to one byte value.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Fill(ulong address, ulong length, byte value)
    {
        using MachineCall call = EnterLiveCall();
        Mm.Fill(address, length, value);
    }

    /// <summary>
    /// pin_user_pages: pins the pages of a range for zero-copy host access through per-page spans. A
    /// pinned page holds an extra reference, so migration, KSM and hot-remove leave it alone; dispose
    /// the result to unpin.
    /// </summary>
    /// <exception cref="SegmentationFault">a page is unmapped or does not allow the access (nothing stays pinned).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public PinnedMemory Pin(ulong address, ulong length, bool write)
    {
        using MachineCall call = EnterLiveCall();
        return Mm.Pin(address, length, write);
    }

    /// <summary>What /proc/pid/pagemap says about the page at <paramref name="address"/>.</summary>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public PagemapEntry GetPagemap(ulong address)
    {
        using MachineCall call = EnterLiveCall();
        return Mm.GetPagemap(address);
    }

    /// <summary>Forks: a child with a copy-on-write copy of this address space.</summary>
    /// <exception cref="InsufficientMemoryException">no frames for the child's page tables (nothing changed).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public VmProcess Fork()
    {
        using MachineCall call = EnterLiveCall();
        AddressSpace? mm = Mm.Fork(Mm.HomeNode);
        if (mm is null)
        {
            if (Mm.Exited)
                throw new InvalidOperationException($"process {Pid} has exited");
            throw new InsufficientMemoryException($"fork of process {Pid}: out of memory");
        }
        return Machine.RegisterFork(this, mm);
    }

    /// <summary>
    /// Exits: unmaps everything and frees every page table. Idempotent; a no-op once the machine is
    /// disposed (the machine's memory went with it), like a Dispose.
    /// </summary>
    public void Exit()
    {
        if (!Machine.TryEnterCall(out MachineCall call))
            return;
        using MachineCall _ = call;
        Machine.Ksm?.Exit(Mm); // never waits for ksmd: it lets the mm go when it next reaches it
        Mm.Teardown();
        Machine.Unregister(this);
    }

    /// <summary>
    /// Opens a machine call for a member that needs a live process: the throwing API (Read, Write,
    /// Fill, Pin, GetPagemap, Fork) refuses an exited process with InvalidOperationException.
    /// (Syscall-shaped members return their errno instead, as Linux's calls on a torn-down mm do.)
    /// </summary>
    private MachineCall EnterLiveCall()
    {
        MachineCall call = Machine.EnterCall();
        if (Mm.Exited)
        {
            call.Dispose();
            throw new InvalidOperationException($"process {Pid} has exited");
        }
        return call;
    }

    /// <inheritdoc/>
    public override string ToString() => $"process {Pid}";
}
