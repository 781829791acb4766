// DedupeStore: the host API for deduplicated buffers. A host application keeps its buffers in Vmm
// memory, KSM merges their identical pages, and the frames merging frees go back to the operating
// system: after a full scan that merged at least 2 MiB, KSM has the allocator decommit every free
// block, single frames included, about two seconds later (Linux's page_reporting_delay; frames reused
// meanwhile stay committed), so the host's RSS falls. Ksm.WaitForMemoryRelease does it at once.
//
// One store is one Vmm process with process-wide merging on (PR_SET_MEMORY_MERGE) in one dedupe
// domain; each buffer is one private anonymous mapping of it. KSM merges only within a domain, so
// stores in different domains never share pages, and the index is keyed per domain so that neither can
// learn the other's contents through merge timing.
//
// EstimateSavings is a dry run of what merging would save: it reads every resident page once, through
// the process's Read (the same access path as any host read: no pin, no reference kept), hashes it with
// PageOps.Checksum64 (the checksum KSM's own index starts from) and confirms every candidate duplicate
// by a byte compare against a copy of the first page seen with that content. It merges nothing, and
// touches no KSM structure or counter. Copies of the distinct contents are kept up to
// MaxCachedCopies pages; beyond that a candidate is confirmed by reading its first page again, so the
// estimate's own memory stays bounded however large the store is.
//
// Locking: the store's lock (_lock) protects its buffer table and disposed flag, and is held across the
// mmap of Allocate and the munmap of a buffer's Dispose (so a range is unmapped before it can be handed
// out again): store lock -> mmap_lock. EstimateSavings copies the table under it and reads outside it.
using System.Runtime.InteropServices;
using Vmm.Native;

namespace Vmm;

/// <summary>
/// Buffers of host data kept in Vmm memory and deduplicated by KSM: create a buffer, write, read, pin
/// it for zero-copy access, dispose. Every page of every buffer is mergeable; identical pages (within
/// this store, and with other mergeable memory of the same dedupe domain) are merged when KSM scans.
/// </summary>
/// <remarks>
/// <para>The store does not run KSM: start ksmd (<c>machine.Ksm.Write("run", "1")</c>) or step it
/// (<see cref="Ksm.RunFullScans"/>). A page merges at the earliest in the second scan that visits it
/// (the first only records its checksum), and only if it did not change in between.</para>
/// <para>This type is thread-safe: all members may be used concurrently from multiple threads. Allocation, buffer disposal and
/// the store's <see cref="Dispose"/> are serialized by one lock; reads and writes of buffers take no
/// store lock, so different buffers (or different parts of one) may be used from different threads at
/// once. <see cref="EstimateSavings"/> may run while buffers are written; it then reports a mix of
/// before and after.</para>
/// <para>Lifetime: a store belongs to its machine; dispose it (and its buffers) before the machine. Disposing
/// the store disposes every buffer, waiting for the reads and writes in flight, and exits its process.
/// Pins taken from buffers keep their frames until they are disposed, also after the store's Dispose,
/// but never past the machine's. After the machine's Dispose every member of the store and of its
/// buffers throws <see cref="ObjectDisposedException"/> naming the Machine, and their Dispose is a
/// no-op.</para>
/// </remarks>
/// <example>
/// <code>
/// using var machine = new Machine();
/// using var store = new DedupeStore(machine);
/// VmmBuffer a = store.Create(payload);
/// VmmBuffer b = store.Create(payload);
/// DedupeEstimate estimate = store.EstimateSavings();   // what merging would save, nothing merged
/// machine.Ksm!.RunFullScans(2);                         // or machine.Ksm.Write("run", "1")
/// using (PinnedBuffer pin = a.Pin())
///     Consume(pin.AsSequence());                        // zero copy; pinned pages are not merged
/// </code>
/// </example>
public sealed class DedupeStore : IDisposable
{
    /// <summary>Distinct contents the estimate keeps copies of (16 MiB); beyond it, candidates are re-read.</summary>
    internal const int MaxCachedCopies = 4096;

    private const int PageSize = PageOps.PageSize;

    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, VmmBuffer> _buffers = []; // by address; protected by _lock
    private bool _disposed;                                       // protected by _lock

    /// <summary>
    /// Creates a store: a new process of <paramref name="machine"/> whose memory is all mergeable, in
    /// dedupe domain <paramref name="domain"/>.
    /// </summary>
    /// <param name="machine">the machine; it must have KSM (<see cref="MachineOptions.EnableKsm"/>).</param>
    /// <param name="domain">the dedupe domain: pages merge only with pages of the same domain (0: the default domain of all mergeable memory).</param>
    /// <param name="homeNode">the NUMA node the buffers' pages are allocated on first.</param>
    /// <exception cref="InvalidOperationException">the machine was built without KSM.</exception>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    public DedupeStore(Machine machine, ushort domain = 0, int homeNode = 0)
    {
        ArgumentNullException.ThrowIfNull(machine);
        if (machine.Ksm is null)
            throw new InvalidOperationException("a DedupeStore needs KSM, and this machine was built without it (MachineOptions.EnableKsm = false)");
        Machine = machine;
        Domain = domain;
        Process = machine.CreateProcess(homeNode: homeNode);
        try
        {
            Errno error = Process.SetMemoryMerge(true);
            if (error != Errno.None)
                throw new InvalidOperationException($"PR_SET_MEMORY_MERGE failed: {error}");
            error = Process.SetDedupeDomain(domain);
            if (error != Errno.None)
                throw new InvalidOperationException($"setting dedupe domain {domain} failed: {error}");
        }
        catch
        {
            Process.Exit();
            throw;
        }
    }

    /// <summary>The machine the store's memory lives on.</summary>
    public Machine Machine { get; }

    /// <summary>The dedupe domain of every buffer of the store.</summary>
    public ushort Domain { get; }

    /// <summary>
    /// The store's process (for its pagemap and counters). Its mappings belong to the buffers: unmapping
    /// or protecting them through it breaks the buffers.
    /// </summary>
    public VmProcess Process { get; }

    /// <summary>A snapshot of the buffers not yet disposed, in address order.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public IReadOnlyCollection<VmmBuffer> Buffers
    {
        get
        {
            using MachineCall call = Machine.EnterCall();
            lock (_lock)
                return [.. _buffers.Values.OrderBy(b => b.Address)];
        }
    }

    /// <summary>
    /// A new buffer of <paramref name="length"/> bytes, reading zero. Only address space is reserved:
    /// frames are allocated as pages are first written.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is not positive.</exception>
    /// <exception cref="InsufficientMemoryException">no room in the process's address space.</exception>
    /// <exception cref="ObjectDisposedException">the store or the machine was disposed.</exception>
    public VmmBuffer Allocate(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            ulong address = Process.Mmap((ulong)length);
            var buffer = new VmmBuffer(this, address, length);
            _buffers.Add(address, buffer);
            return buffer;
        }
    }

    /// <summary>A new buffer holding a copy of <paramref name="contents"/>.</summary>
    /// <exception cref="ArgumentException"><paramref name="contents"/> is empty.</exception>
    /// <exception cref="InsufficientMemoryException">the machine ran out of frames (no buffer is left behind).</exception>
    /// <exception cref="ObjectDisposedException">the store or the machine was disposed.</exception>
    public VmmBuffer Create(ReadOnlySpan<byte> contents)
    {
        if (contents.IsEmpty)
            throw new ArgumentException("a buffer needs at least one byte", nameof(contents));
        VmmBuffer buffer = Allocate(contents.Length);
        try
        {
            buffer.Write(0, contents);
        }
        catch
        {
            buffer.Dispose();
            throw;
        }
        return buffer;
    }

    /// <summary>
    /// A dry run: what merging the store's buffers would save under the current KSM knobs
    /// (use_zero_pages, max_page_sharing, merge_across_nodes), without merging. Reads every resident
    /// page once; changes no page, mapping or KSM counter. Pages shared with memory outside the store
    /// are not considered, and pinned pages are counted as if unpinned (a pin only delays their merge).
    /// See <see cref="DedupeEstimate"/> for what each count means.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the store or the machine was disposed.</exception>
    public DedupeEstimate EstimateSavings()
    {
        using MachineCall call = Machine.EnterCall();
        VmmBuffer[] buffers;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            buffers = [.. _buffers.Values.OrderBy(b => b.Address)];
        }
        KsmKnobs knobs = Machine.Ksm!.GetKnobs();
        var index = new ContentIndex(Process, separateNodes: !knobs.MergeAcrossNodes);
        var page = new byte[PageSize];
        long pages = 0, zeroPages = 0;
        foreach (VmmBuffer buffer in buffers)
        {
            // Entered for the whole buffer, so that it cannot be unmapped (and its range reused) under the reads.
            if (!buffer.TryEnter())
                continue;
            try
            {
                ulong stop = buffer.Address + (ulong)buffer.PageCount * PageSize;
                for (ulong va = buffer.Address; va < stop; va += PageSize)
                {
                    // Where no page table exists nothing is present: skip it whole (at the start and at
                    // each table boundary), so the estimate costs what the buffer holds, not its length.
                    if (va == buffer.Address || (va & (PageSize * 512 - 1)) == 0)
                    {
                        va = Process.Mm.SkipToPageTable(va, stop);
                        if (va >= stop)
                            break;
                    }
                    // Only pages with a frame of their own: never-written pages cost nothing to begin with,
                    // and KSM does not scan them (nor the zero page that a read maps).
                    PagemapEntry entry = Process.GetPagemap(va);
                    if (!entry.Present || entry.ZeroPage)
                        continue;
                    // The whole page, also past Length in the last one: KSM compares whole pages.
                    Process.Read(va, page);
                    pages++;
                    bool zero = PageOps.IsZero(page);
                    if (zero)
                        zeroPages++;
                    if (zero && knobs.UseZeroPages)
                        continue; // it would map the zero page: no content to keep
                    index.Add(page, va, entry.Node);
                }
            }
            finally
            {
                buffer.Leave();
            }
        }
        long distinct = 0, duplicates = knobs.UseZeroPages ? zeroPages : 0;
        foreach (long count in index.Counts())
        {
            distinct++;
            long copies = (count + knobs.MaxPageSharing - 1) / knobs.MaxPageSharing; // a KSM page takes max_page_sharing mappings
            duplicates += count - copies;
        }
        return new DedupeEstimate(pages, zeroPages, distinct, duplicates, duplicates * PageSize,
            pages == 0 ? 0 : 100.0 * duplicates / pages);
    }

    /// <summary>The store's KSM counters (its process's /proc/pid/ksm_stat).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public ProcessKsmStats GetKsmStats() => Process.GetKsmStats();

    /// <summary>
    /// Disposes every buffer (waiting for operations in flight) and exits the store's process: every
    /// page goes back to the machine. Idempotent. Pins still held keep their pages until disposed.
    /// After the machine's Dispose it only marks the store and its buffers disposed (the memory went
    /// with the machine).
    /// </summary>
    public void Dispose()
    {
        VmmBuffer[] buffers;
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            buffers = [.. _buffers.Values];
            _buffers.Clear();
        }
        foreach (VmmBuffer buffer in buffers)
            buffer.Close();
        Process.Exit(); // unmaps everything at once: one teardown instead of a munmap per buffer
    }

    /// <summary>A buffer's Dispose, once no operation on it is in flight: unmaps it.</summary>
    internal void Release(VmmBuffer buffer)
    {
        // A buffer disposed after its machine: nothing left to unmap.
        if (!Machine.TryEnterCall(out MachineCall call))
            return;
        using MachineCall _ = call;
        lock (_lock)
        {
            // After the store's Dispose began, its exit unmaps everything.
            if (_disposed || !_buffers.Remove(buffer.Address))
                return;
            // Under the lock: the range must be unmapped before Allocate can hand it out again.
            Errno error = Process.Munmap(buffer.Address, (ulong)buffer.Length);
            if (error != Errno.None)
                throw new VmBugException($"munmap of {buffer} failed: {error}");
        }
    }

    /// <inheritdoc/>
    public override string ToString() => $"DedupeStore (domain {Domain}, {Process})";

    /// <summary>
    /// Distinct page contents with their counts: a hash index on Checksum64 (per node when pages of
    /// different nodes must stay apart), each candidate confirmed by a full compare.
    /// </summary>
    private sealed unsafe class ContentIndex
    {
        private const int PagesPerChunk = 64; // 256 KiB copy chunks: no large-object-heap churn per page

        private readonly VmProcess _process;
        private readonly bool _separateNodes;
        private readonly Dictionary<(ulong Checksum, int Node), int> _heads = [];
        private readonly List<Content> _contents = [];
        private readonly List<byte[]> _chunks = [];
        private readonly byte[] _reread = new byte[PageSize];

        public ContentIndex(VmProcess process, bool separateNodes)
        {
            _process = process;
            _separateNodes = separateNodes;
        }

        private struct Content
        {
            public ulong Address; // the first page seen with this content
            public int Copy;      // its copy's slot, or -1 (beyond MaxCachedCopies: re-read Address)
            public int Next;      // the next content with the same key (a checksum collision), or -1
            public long Count;
        }

        public void Add(byte[] page, ulong va, int node)
        {
            ulong checksum;
            fixed (byte* p = page)
                checksum = PageOps.Checksum64(p);
            var key = (checksum, _separateNodes ? node : 0);
            ref int head = ref CollectionsMarshal.GetValueRefOrAddDefault(_heads, key, out bool exists);
            if (exists)
            {
                Span<Content> contents = CollectionsMarshal.AsSpan(_contents);
                for (int c = head; c >= 0; c = contents[c].Next)
                {
                    // The checksum is only a hint: a page counts as a duplicate after a byte compare.
                    if (TryGetCopy(contents[c], out ReadOnlySpan<byte> copyOfFirst) && PageOps.PageEquals(page, copyOfFirst))
                    {
                        contents[c].Count++;
                        return;
                    }
                }
            }
            int copy = -1;
            if (_contents.Count < MaxCachedCopies)
            {
                copy = _contents.Count;
                if (copy / PagesPerChunk == _chunks.Count)
                    _chunks.Add(GC.AllocateUninitializedArray<byte>(PagesPerChunk * PageSize));
                page.CopyTo(_chunks[copy / PagesPerChunk].AsSpan(copy % PagesPerChunk * PageSize, PageSize));
            }
            _contents.Add(new Content { Address = va, Copy = copy, Next = exists ? head : -1, Count = 1 });
            head = _contents.Count - 1;
        }

        /// <summary>The bytes of a content's first page: its copy, or the page read again.</summary>
        private bool TryGetCopy(in Content content, out ReadOnlySpan<byte> bytes)
        {
            if (content.Copy >= 0)
            {
                bytes = _chunks[content.Copy / PagesPerChunk].AsSpan(content.Copy % PagesPerChunk * PageSize, PageSize);
                return true;
            }
            try
            {
                _process.Read(content.Address, _reread);
                bytes = _reread;
                return true;
            }
            catch (Exception e) when (e is SegmentationFault or InsufficientMemoryException)
            {
                // Its buffer was disposed since (or a page table could not be had): nothing to compare with, so no match.
                bytes = default;
                return false;
            }
        }

        public IEnumerable<long> Counts()
        {
            foreach (Content content in _contents)
                yield return content.Count;
        }
    }
}
