// Process: a managed "process" whose memory is real: its address space maps virtual ranges onto the
// machine's frames. The host reads and writes it through virtual addresses; a bad access throws
// SegmentationFault. Syscall-shaped calls return Linux's errno and never throw for an expected failure.
using Vmm.Mm;

namespace Vmm;

/// <summary>A process of a <see cref="Machine"/>: credentials, a home node and an address space.</summary>
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
    public long RssAnonPages => Volatile.Read(ref Mm.RssAnon);

    /// <summary>Shared anonymous pages mapped (RssShmem).</summary>
    public long RssShmemPages => Volatile.Read(ref Mm.RssShmem);

    /// <summary>Page-table frames (VmPTE / 4 KiB).</summary>
    public long PageTablePages => Volatile.Read(ref Mm.PageTablePages);

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
    public Errno Mmap(ulong address, ulong length, Protection protection, MapFlags flags, out ulong mapped) =>
        Mm.Mmap(address, length, protection, flags, out mapped);

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
    public ulong Mmap(ulong length, Protection protection = Protection.ReadWrite, MapFlags flags = MapFlags.Private)
    {
        ArgumentOutOfRangeException.ThrowIfZero(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, AddressSpace.TaskSize);
        if ((flags & (MapFlags.Fixed | MapFlags.FixedNoReplace)) != 0)
            throw new ArgumentException("a fixed mapping needs an address: use Mmap(address, length, protection, flags, out mapped)", nameof(flags));
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
    public Errno Munmap(ulong address, ulong length) => Mm.Munmap(address, length);

    /// <summary>
    /// mprotect, with Linux's checks in Linux's order. EINVAL: both GrowsDown and GrowsUp, a misaligned start,
    /// bits other than Read, Write, Exec and Sem (PROT_SEM is accepted and has no effect); a zero length
    /// succeeds; ENOMEM: a range that wraps, or a part that is not mapped (addresses outside user space
    /// are never mapped; the part before the hole is changed, as in Linux); then GrowsDown / GrowsUp is
    /// EINVAL, since no Vmm mapping grows.
    /// </summary>
    public Errno Mprotect(ulong address, ulong length, Protection protection) => Mm.Mprotect(address, length, protection);

    /// <summary>
    /// madvise. EINVAL: misaligned start, a length that wraps when rounded up or added to the start,
    /// unknown advice (Mergeable / Unmergeable without KSM); ENOMEM: part of the range unmapped (addresses
    /// outside user space, non-canonical ones included, are never mapped). A zero length succeeds.
    /// </summary>
    public Errno Madvise(ulong address, ulong length, Advice advice) => Mm.Madvise(address, length, advice);

    /// <summary>
    /// prctl(PR_SET_MEMORY_MERGE): merge every private mapping of the process, present and future (KSM's
    /// process-wide mode; inherited by fork). Disabling unmerges everything first. EINVAL when the machine
    /// has no KSM; ENOMEM if unmerging ran out of memory (merging then stays on).
    /// </summary>
    public Errno SetMemoryMerge(bool enable) => Mm.SetMemoryMerge(enable);

    /// <summary>Whether process-wide merging is on: false on a machine without KSM (where <see cref="GetMemoryMerge"/> is EINVAL).</summary>
    public bool IsMemoryMergeEnabled => Mm.KsmMergeAny;

    /// <summary>
    /// prctl(PR_GET_MEMORY_MERGE): whether process-wide merging is on. EINVAL on a machine without KSM
    /// (<paramref name="enabled"/> is then false), as Linux's prctl without CONFIG_KSM.
    /// </summary>
    public Errno GetMemoryMerge(out bool enabled)
    {
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
    public Errno SetDedupeDomain(ulong address, ulong length, ushort domain) => Mm.SetDedupeDomain(address, length, domain, wholeProcess: false);

    /// <summary>Puts the whole process, and every mapping it makes later, in dedupe domain <paramref name="domain"/>.</summary>
    public Errno SetDedupeDomain(ushort domain) => Mm.SetDedupeDomain(0, 0, domain, wholeProcess: true);

    /// <summary>The process's KSM counters (/proc/pid/ksm_stat); all zero when the machine has no KSM.</summary>
    public ProcessKsmStats GetKsmStats() =>
        Machine.Ksm is null ? new ProcessKsmStats(0, 0, 0, 0, false, false) : Ksm.GetProcessStats(Mm);

    /// <summary>The field names of /proc/pid/ksm_stat that <see cref="ReadKsmStat"/> knows.</summary>
    public static IReadOnlyList<string> KsmStatNames { get; } =
        ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit", "ksm_merge_any", "ksm_mergeable"];

    /// <summary>
    /// One field of /proc/pid/ksm_stat by name (ksm_merge_any and ksm_mergeable read 1 or 0). ENOENT (and
    /// 0) for an unknown name, and for every name on a machine without KSM (the file does not exist there).
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="name"/> is null.</exception>
    public Errno ReadKsmStat(string name, out long value)
    {
        ArgumentNullException.ThrowIfNull(name);
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
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (for a page table or the zero page).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public void Read(ulong address, Span<byte> destination) => Mm.Read(address, destination);

    /// <summary>Writes user memory. An empty source writes nothing and never faults.</summary>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable, or the range starts at or
    /// runs into TASK_SIZE (non-canonical addresses included); the pages before a bad one may have been
    /// written, as on Linux.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (what was written before stays).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public void Write(ulong address, ReadOnlySpan<byte> source) => Mm.Write(address, source);

    /// <summary>Reads one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not readable, or the value starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public T Read<T>(ulong address) where T : unmanaged => Mm.ReadValue<T>(address);

    /// <summary>Writes one unmanaged value.</summary>
    /// <exception cref="SegmentationFault">the address is unmapped or not writable, or the value starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames.</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public void Write<T>(ulong address, T value) where T : unmanaged => Mm.WriteValue(address, value);

    /// <summary>Sets a range of user memory to one byte value. A zero length does nothing.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="address"/> + <paramref name="length"/> wraps past 2^64.</exception>
    /// <exception cref="SegmentationFault">a page is unmapped or not writable (the pages before it were filled,
    /// as on Linux), or the range starts at or runs into TASK_SIZE.</exception>
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (what was filled before stays).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public void Fill(ulong address, ulong length, byte value) => Mm.Fill(address, length, value);

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
    /// <exception cref="InsufficientMemoryException">the machine is out of frames (nothing stays pinned).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public PinnedMemory Pin(ulong address, ulong length, bool write) => Mm.Pin(address, length, write);

    /// <summary>
    /// What /proc/pid/pagemap says about the page at <paramref name="address"/>. An address outside user
    /// space (at or above TASK_SIZE, non-canonical ones included) has nothing mapped: the entry is not
    /// present (Linux's pagemap read there returns no entries, not an error).
    /// </summary>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public PagemapEntry GetPagemap(ulong address) => Mm.GetPagemap(address);

    /// <summary>Forks: a child with a copy-on-write copy of this address space.</summary>
    /// <exception cref="InsufficientMemoryException">no frames for the child's page tables (nothing changed).</exception>
    /// <exception cref="InvalidOperationException">the process has exited.</exception>
    public VmProcess Fork()
    {
        if (Mm.Exited)
            throw new InvalidOperationException($"process {Pid} has exited");
        AddressSpace? mm = Mm.Fork(Mm.HomeNode);
        if (mm is null)
        {
            if (Mm.Exited)
                throw new InvalidOperationException($"process {Pid} has exited");
            throw new InsufficientMemoryException($"fork of process {Pid}: out of memory");
        }
        return Machine.RegisterFork(this, mm);
    }

    /// <summary>Exits: unmaps everything and frees every page table. Idempotent.</summary>
    public void Exit()
    {
        Machine.Ksm?.Exit(Mm); // never waits for ksmd: it lets the mm go when it next reaches it
        Mm.Teardown();
        Machine.Unregister(this);
    }

    /// <inheritdoc/>
    public override string ToString() => $"process {Pid}";
}
