// VmProcess: a managed "process" whose memory is real: its address space maps virtual ranges onto the
// machine's frames. The host reads and writes it through virtual addresses; a bad access throws
// SegmentationFault. Syscall-shaped calls return Linux's errno and never throw for an expected failure.
// The process is a thin public face over its AddressSpace (Mm/AddressSpace.cs), which does the work.
//
// Locking: none of its own; every call opens a MachineCall, and the address space takes its mmap_lock
// (docs/locking.md).
using Vmm.Mm;

namespace Vmm;

/// <summary>A process of a <see cref="Machine"/>: credentials, a home node and an address space.</summary>
/// <remarks>
/// This type is thread-safe: all members may be used concurrently from multiple threads, as the threads
/// of a Linux process share one mm: reads and writes from different threads run in parallel (concurrent
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
public sealed partial class VmProcess
{
    internal VmProcess(Machine machine, int pid, Credentials credentials, AddressSpace mm)
    {
        Machine = machine;
        Pid = pid;
        _credentials = credentials;
        Mm = mm;
    }

    /// <summary>The machine it runs on.</summary>
    public Machine Machine { get; }

    /// <summary>VmProcess id, unique per machine.</summary>
    public int Pid { get; }

    /// <summary>Who it runs as now (its credentials change through <see cref="SetUid"/> and friends; a fork inherits the current ones).</summary>
    public Credentials Credentials
    {
        get
        {
            lock (_credentialsLock)
                return _credentials;
        }
    }

    /// <summary>The node its new pages are allocated on first.</summary>
    public int HomeNode => Mm.HomeNode;

    /// <summary>True once <see cref="Exit"/> has run.</summary>
    public bool HasExited => Mm.Exited;

    internal AddressSpace Mm { get; }

    private Cpuset? _cpuset; // written under the machine's cpuset lock; set before the process is published

    /// <summary>The cpuset the process belongs to (its allocations stay inside its <see cref="Vmm.Cpuset.Mems"/>).</summary>
    public Cpuset Cpuset => Volatile.Read(ref _cpuset)!;

    /// <summary>The process's cpuset. Set only under the machine's cpuset lock.</summary>
    internal Cpuset CpusetLocked
    {
        get => _cpuset!;
        set => Volatile.Write(ref _cpuset, value);
    }

    /// <summary>
    /// set_mempolicy: the process's memory policy, used by every fault of a mapping without its own
    /// (<see cref="Mbind"/>). The nodes are restricted to the cpuset's mems (with
    /// <see cref="MempolicyFlags.RelativeNodes"/>, folded onto them). EINVAL: an unknown mode or flag,
    /// StaticNodes with RelativeNodes, nodes with Default or Local, none with Bind, Interleave,
    /// WeightedInterleave or PreferredMany, a flag on Local or on Preferred without nodes (which
    /// otherwise means Local), or no given node left inside the cpuset's mems.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetMempolicy(MempolicyMode mode, NodeMask nodes, MempolicyFlags flags = MempolicyFlags.None)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.SetMempolicy(mode, nodes, flags);
    }

    /// <summary>
    /// get_mempolicy. Without flags: the process's policy (<paramref name="mode"/> is the mode with its
    /// MempolicyFlags bits or-ed in, as Linux; Default when none) and its nodes (the user's nodes for a
    /// StaticNodes / RelativeNodes policy, empty for Default and Local). Address: the policy of the mapping
    /// at <paramref name="address"/> (Default when it has none of its own). Node alone: the node the
    /// process's Interleave / WeightedInterleave policy would use next. Node with Address: the node of the
    /// page at the address, read-faulted in first. MemsAllowed alone: the cpuset's mems in
    /// <paramref name="nodes"/>. EINVAL: an unknown flag, MemsAllowed with another flag, an address without
    /// Address, Node alone without an interleave policy; EFAULT: no mapping at the address (or, with Node,
    /// one that cannot be read); ENOMEM: no frame to fault the page in.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno GetMempolicy(out int mode, out NodeMask nodes, ulong address = 0, GetMempolicyFlags flags = GetMempolicyFlags.None)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.GetMempolicy(out mode, out nodes, address, flags);
    }

    /// <summary>
    /// mbind: gives [<paramref name="address"/>, + <paramref name="length"/> rounded up to pages) its own
    /// memory policy (Default removes it), splitting and merging mappings at the edges. Errors in Linux's
    /// order: EINVAL for an unknown mode or mode flag or StaticNodes with RelativeNodes, for unknown
    /// <paramref name="flags"/>; EPERM for MoveAll without CAP_SYS_NICE; EINVAL for a misaligned address, a
    /// range that wraps, or nodes the mode does not accept (as <see cref="SetMempolicy"/>); EFAULT when part
    /// of the range is not mapped (Default accepts holes, but not a range with no mapping at all); EIO with
    /// Strict alone when a page of the range already lies outside <paramref name="nodes"/> (the policy is
    /// then not applied, as Linux 6.7+). Move migrates the pages of the range that lie outside the nodes and
    /// that this process alone maps to where the new policy puts them (MoveAll: shared pages too); with
    /// Strict, a page that could not be moved (pinned, busy, no frame) makes the call EIO after the policy
    /// was applied. A zero length does nothing.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Mbind(ulong address, ulong length, MempolicyMode mode, NodeMask nodes,
        MempolicyFlags modeFlags = MempolicyFlags.None, MovePolicyFlags flags = MovePolicyFlags.None)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Mbind(address, length, mode, nodes, modeFlags, flags, Credentials);
    }

    /// <summary>
    /// The <see cref="Exception.Data"/> key under which an <see cref="InsufficientMemoryException"/> thrown
    /// by an access (Read, Write, Fill, typed access) carries the address (a <see cref="ulong"/>) whose
    /// page could not be served: the bytes before it were read or written, as a SegmentationFault's
    /// Address says for a bad page.
    /// </summary>
    public const string FaultAddressKey = "Vmm.FaultAddress";

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
    /// mmap of anonymous memory. Protection bits other than read, write and exec are ignored (PROT_SEM,
    /// PROT_GROWSDOWN, unknown bits), as Linux's mmap ignores them. EINVAL: zero length, neither Private
    /// nor Shared, a misaligned fixed address; EPERM: a fixed address below mmap_min_addr (64 KiB); ENOMEM: a
    /// length that overflows when rounded to pages, no room, or a fixed range outside user space;
    /// EEXIST: FixedNoReplace over a mapping; EOPNOTSUPP: an unknown flag with SharedValidate (without
    /// it, unknown flags are ignored, as in Linux). A hint is rounded up to a page and used if free (a
    /// hint outside user space is ignored). An exited process: ENOMEM.
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

    /// <summary>Maps <paramref name="length"/> bytes of anonymous memory anywhere; throws if that fails.</summary>
    /// <param name="length">bytes, 1 to TASK_SIZE (0x7FFF_FFFF_F000); rounded up to whole pages.</param>
    /// <param name="protection">PROT_* bits (bits other than read, write and exec are ignored).</param>
    /// <param name="flags">Private or Shared, plus Populate.</param>
    /// <returns>the start of the new mapping.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is 0 or larger than user space.</exception>
    /// <exception cref="ArgumentException"><paramref name="flags"/> names neither Private nor Shared, asks for a
    /// fixed address (use the errno overload), or has an unknown flag with SharedValidate.</exception>
    /// <exception cref="InsufficientMemoryException">no room left in the address space (ENOMEM).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("ApiDesign", "RS0027", Justification =
        "Deliberate pair: the errno form takes every mmap argument; this throwing form takes the common ones, with defaults.")]
    public ulong Mmap(ulong length, Protection protection = Protection.ReadWrite, MapFlags flags = MapFlags.Private)
    {
        ArgumentOutOfRangeException.ThrowIfZero(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, AddressSpace.TaskSize);
        if ((flags & (MapFlags.Fixed | MapFlags.FixedNoReplace)) != 0)
            throw new ArgumentException("a fixed mapping needs an address: use Mmap(address, length, protection, flags, out mapped)", nameof(flags));
        using MachineCall call = Machine.EnterCall();
        Mm.ThrowIfExited();
        Errno error = Mm.Mmap(0, length, protection, flags, out ulong mapped);
        return error switch
        {
            Errno.None => mapped,
            Errno.EINVAL or Errno.EOPNOTSUPP => throw new ArgumentException($"mmap flags {flags}: {error}", nameof(flags)),
            Errno.ENOMEM when Mm.Exited => throw new InvalidOperationException($"process {Pid} has exited"),
            _ => throw new InsufficientMemoryException($"mmap of {length} bytes in process {Pid}: no room in the address space ({error})"),
        };
    }

    /// <summary>
    /// munmap. EINVAL: misaligned start, zero or overflowing length, or a range that does not lie in user
    /// space (a start above TASK_SIZE, non-canonical addresses included). Unmapped parts are fine.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Munmap(ulong address, ulong length)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Munmap(address, length);
    }

    /// <summary>
    /// mprotect, with Linux's checks in Linux's order. EINVAL: both GrowsDown and GrowsUp, a misaligned start,
    /// bits other than Read, Write, Exec and Sem (PROT_SEM is accepted and has no effect); a zero length
    /// succeeds; ENOMEM: a range that wraps, or a part that is not mapped (addresses outside user space
    /// are never mapped; the part before the hole is changed, as in Linux); then GrowsDown / GrowsUp is
    /// EINVAL, since no Vmm mapping grows.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Mprotect(ulong address, ulong length, Protection protection)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Mprotect(address, length, protection);
    }

    /// <summary>
    /// madvise. EINVAL: misaligned start, a length that wraps when rounded up or added to the start,
    /// unknown advice (Mergeable / Unmergeable without KSM); ENOMEM: part of the range unmapped (addresses
    /// outside user space, non-canonical ones included, are never mapped). A zero length succeeds.
    /// <see cref="Advice.HwPoison"/> and <see cref="Advice.SoftOffline"/> (madvise_inject_error) need
    /// CAP_SYS_ADMIN (EPERM) and go page by page, stopping at the first error: EFAULT for an address with
    /// no readable page (unmapped, PROT_NONE, or poisoned already); EBUSY for a page Vmm does not poison
    /// (the zero page of untouched memory, a KSM page) or one still referenced elsewhere (a pin: the page
    /// is poisoned all the same), or that could not be moved; EIO for a soft offline of the zero page;
    /// ENOMEM when no frame is free for the move.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Madvise(ulong address, ulong length, Advice advice)
    {
        using MachineCall call = Machine.EnterCall();
        return Mm.Madvise(address, length, advice, Credentials.Has(Capabilities.SysAdmin));
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

    /// <summary>Whether process-wide merging is on: false on a machine without KSM (where <see cref="GetMemoryMerge"/> is EINVAL).</summary>
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
    /// prctl(PR_GET_MEMORY_MERGE): whether process-wide merging is on. EINVAL on a machine without KSM
    /// (<paramref name="enabled"/> is then false), as Linux's prctl without CONFIG_KSM.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno GetMemoryMerge(out bool enabled)
    {
        using MachineCall call = Machine.EnterCall();
        enabled = Machine.Ksm is not null && Mm.KsmMergeAny;
        return Machine.Ksm is null ? Errno.EINVAL : Errno.None;
    }

    /// <summary>
    /// Puts a range in a dedupe domain: KSM merges pages only within one domain (default 0 for
    /// everything), and the index is keyed per domain, so one domain cannot learn another's contents
    /// by merging with them. Pages merged under the old domain are unmerged first. madvise's range rules:
    /// EINVAL for a misaligned start or a length that wraps when rounded up to pages or added to the
    /// start; a zero length succeeds; ENOMEM: part of the range unmapped (the mapped part still changes).
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

    /// <summary>The field names of /proc/pid/ksm_stat that <see cref="ReadKsmStat"/> knows.</summary>
    public static IReadOnlyList<string> KsmStatNames { get; } =
        ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit", "ksm_merge_any", "ksm_mergeable"];

    /// <summary>
    /// One field of /proc/pid/ksm_stat by name (ksm_merge_any and ksm_mergeable read 1 or 0). ENOENT (and
    /// 0) for an unknown name, and for every name on a machine without KSM (the file does not exist there).
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="name"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno ReadKsmStat(string name, out long value)
    {
        ArgumentNullException.ThrowIfNull(name);
        using MachineCall call = Machine.EnterCall();
        value = 0;
        if (Machine.Ksm is null || !KsmStatNames.Contains(name))
            return Errno.ENOENT;
        ProcessKsmStats stats = GetKsmStats();
        value = name switch
        {
            "ksm_rmap_items" => stats.RmapItems,
            "ksm_zero_pages" => stats.ZeroPages,
            "ksm_merging_pages" => stats.MergingPages,
            "ksm_process_profit" => stats.ProcessProfit,
            "ksm_merge_any" => stats.MergeAny ? 1 : 0,
            _ => stats.Mergeable ? 1 : 0,
        };
        return Errno.None;
    }

    /// <summary>Reads user memory. An empty destination reads nothing and never faults.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not readable, or the range starts at or
    /// runs into TASK_SIZE (non-canonical addresses included); see the exception for partial reads.</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (for a page table or the zero page).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Read(ulong address, Span<byte> destination)
    {
        using MachineCall call = EnterLiveCall();
        Mm.Read(address, destination);
    }

    /// <summary>Writes user memory. An empty source writes nothing and never faults.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable, or the range starts at or
    /// runs into TASK_SIZE (non-canonical addresses included); the pages before a bad one may have been
    /// written, as on Linux.</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (what was written before stays).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Write(ulong address, ReadOnlySpan<byte> source)
    {
        using MachineCall call = EnterLiveCall();
        Mm.Write(address, source);
    }

    /// <summary>Reads one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not readable, or the value starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public T Read<T>(ulong address) where T : unmanaged
    {
        // The fast path takes no call marker: its one access section is what Machine.Dispose waits for.
        if (Mm.TryReadValue(address, out T read))
            return read;
        using MachineCall call = EnterLiveCall();
        return Mm.ReadValueSlow<T>(address);
    }

    /// <summary>Writes one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not writable, or the value starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Write<T>(ulong address, T value) where T : unmanaged
    {
        if (Mm.TryWriteValue(address, value))
            return; // as in Read<T>: the access section alone keeps Dispose waiting
        using MachineCall call = EnterLiveCall();
        Mm.WriteValueSlow(address, value);
    }

    /// <summary>Sets a range of user memory to one byte value. A zero length does nothing.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="address"/> + <paramref name="length"/> wraps past 2^64.</exception>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable (the pages before it were filled,
    /// as on Linux), or the range starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (what was filled before stays).</exception>
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
    /// <remarks>
    /// The range is checked before anything is allocated, and the pin's bookkeeping grows with the pages
    /// actually pinned: a huge length over a small mapping faults at the first unmapped page, having cost
    /// only what it pinned before (and unpinned again).
    /// </remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is 0, the range wraps past 2^64,
    /// or it spans more pages than an array can hold.</exception>
    /// <exception cref="SegmentationFault">a page is unmapped or does not allow the access, or the range starts at or
    /// runs into TASK_SIZE (nothing stays pinned).</exception>
    /// <exception cref="BusError">a page of the range was poisoned (memory failure: <see cref="Advice.HwPoison"/>); the pages before it were done.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (nothing stays pinned).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public PinnedMemory Pin(ulong address, ulong length, bool write)
    {
        using MachineCall call = EnterLiveCall();
        return Mm.Pin(address, length, write);
    }

    /// <summary>
    /// pin_user_pages with or without FOLL_LONGTERM. Without <paramref name="longTerm"/> this is the
    /// short-term <see cref="Pin(ulong, ulong, bool)"/>. With it, the pin may be held for an unbounded time,
    /// so no pinned page may lie in ZONE_MOVABLE (whose blocks must always be able to go offline): each page
    /// of the range that lies there is first migrated to a frame outside it (reason
    /// <see cref="MigrateReason.LongtermPin"/>; the page's node first, any node when that one is full),
    /// contents, mappings and sharing kept, and then the range is pinned. The pages stay there while
    /// pinned.
    /// </summary>
    /// <remarks>
    /// <para>As in Linux, the range is pinned, every page that is not long-term pinnable is isolated, the
    /// whole range is unpinned, those pages are migrated, and the range is pinned again, for as long as
    /// the migration moves every page it was given. The shared zero page is long-term pinnable wherever it
    /// lies. A page pinned read-only is first made the process's own (as for a short-term pin), so a KSM
    /// page or a page shared with a forked child is copied, and the copy is what moves.</para>
    /// <para>Use a short-term pin for I/O-like access that ends soon (it costs no migration); use a
    /// long-term pin for memory handed to something that keeps it (a registered buffer, a device ring).
    /// A short-term pin of a page in ZONE_MOVABLE holds up an offline of its block until it is disposed.</para>
    /// </remarks>
    /// <param name="address">the first byte to pin.</param>
    /// <param name="length">how many bytes to pin.</param>
    /// <param name="write">true to write through <see cref="PinnedMemory.GetSpan"/>.</param>
    /// <param name="longTerm">true for FOLL_LONGTERM: move the pages out of ZONE_MOVABLE first.</param>
    /// <returns>the pin (<see cref="PinnedMemory.IsLongTerm"/> is <paramref name="longTerm"/>); dispose it to unpin.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is 0, the range wraps past 2^64,
    /// or it spans more pages than an array can hold.</exception>
    /// <exception cref="SegmentationFault">a page is unmapped or does not allow the access, or the range starts at or
    /// runs into TASK_SIZE (nothing stays pinned).</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames; or, for a long-term pin, a page
    /// could not be moved out of ZONE_MOVABLE: no free frame outside it, or the page is held by someone else
    /// (Linux's -ENOMEM for both). Nothing stays pinned and every page is where it was or moved whole.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public PinnedMemory Pin(ulong address, ulong length, bool write, bool longTerm)
    {
        using MachineCall call = EnterLiveCall();
        return Mm.Pin(address, length, write, longTerm);
    }

    /// <summary>
    /// What /proc/pid/pagemap says about the page at <paramref name="address"/>. An address outside user
    /// space (at or above TASK_SIZE, non-canonical ones included) has nothing mapped: the entry is not
    /// present (Linux's pagemap read there returns no entries, not an error).
    /// </summary>
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
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
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
