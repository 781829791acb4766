// The data structures of KSM (Linux's ksm_rmap_item, ksm_stable_node, ksm_mm_slot), sized for the
// "64 bytes of metadata per scanned page" budget.
//
// Rmap items are not objects: they live in a chunked array of structs and are named by int handles, so
// a scanned page costs one 56-byte slot and no GC object. Chunks are never moved or freed, so a reverse
// map walker that holds a KSM page's lock can follow hlist links while the scanner allocates elsewhere.
// Stable nodes are objects (one per KSM page, far fewer than items), registered in the machine's
// MappingRegistry so that a KSM page's mapping word can name one by handle.
//
// Locking: items, nodes and slots are protected by the KSM thread mutex; a stable node's item list also
// by its KSM page's lock; the slot list by the mm-list lock. Each field says which.
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm;

/// <summary>
/// One scanned (mm, virtual page): Linux's ksm_rmap_item. 56 bytes. Every field is protected by the KSM
/// thread mutex; while the item is on a stable node's list, HashNext / HashPrev (and the node's Hlist)
/// change only with that KSM page's lock held as well, so rmap walkers holding the page lock can follow them.
/// </summary>
internal struct KsmRmapItem
{
    /// <summary>Low byte of the full-scan count when the item entered the unstable index.</summary>
    public const ulong SeqnrMask = 0xFF;

    /// <summary>The item is in an unstable index (UNSTABLE_FLAG).</summary>
    public const ulong UnstableFlag = 0x100;

    /// <summary>The item is on a stable node's list (STABLE_FLAG).</summary>
    public const ulong StableFlag = 0x200;

    /// <summary>The page address with the flags above in its low bits.</summary>
    public ulong Address;

    /// <summary>The checksum seen at the last visit (oldchecksum; 0 when fresh).</summary>
    public ulong Checksum;

    /// <summary>While on a stable node: the anon_vma of its VMA (a reference that keeps the family findable).</summary>
    public AnonVma? AnonVma;

    /// <summary>Next item of the same mm, in address order; -1 at the end.</summary>
    public int Next;

    /// <summary>Next item in the unstable bucket, or on the stable node's list; -1 at the end.</summary>
    public int HashNext;

    /// <summary>Previous item on the stable node's list; -1 at the head.</summary>
    public int HashPrev;

    /// <summary>Index of the stable node (in the KSM node table) while StableFlag is set.</summary>
    public int Node;

    /// <summary>Index of the mm slot the item belongs to.</summary>
    public int Slot;

    /// <summary>The dedupe domain the page was filed under.</summary>
    public ushort Domain;

    /// <summary>The NUMA node of the tree it sits in (merge_across_nodes = 0).</summary>
    public byte Nid;

    /// <summary>smart_scan: visits as a non-KSM page (saturates at 255).</summary>
    public byte Age;

    /// <summary>smart_scan: visits still to skip.</summary>
    public byte RemainingSkips;

    public readonly ulong PageAddress => Address & ~AddressSpace.PageMask;
}

/// <summary>
/// The chunked store of rmap items. Preconditions: Allocate and Free, the KSM thread mutex held; the
/// indexer, the thread mutex or the page lock of the KSM page whose stable node lists the item (rmap
/// walkers). Not asserted here (the pool does not know the mutex): its callers are Ksm methods that
/// assert the thread mutex (LockAssert) or the page lock at their entry.
/// </summary>
internal sealed class KsmRmapItemPool
{
    private const int ChunkShift = 12;
    private const int ChunkSize = 1 << ChunkShift;

    private KsmRmapItem[][] _chunks = new KsmRmapItem[16][];
    private int _chunkCount;
    private int _freeHead = -1;

    /// <summary>Items in use.</summary>
    public long Count { get; private set; }

    /// <summary>Bytes the store holds (allocated chunks).</summary>
    public long Bytes => (long)_chunkCount * ChunkSize * System.Runtime.CompilerServices.Unsafe.SizeOf<KsmRmapItem>();

    public ref KsmRmapItem this[int handle] => ref _chunks[handle >> ChunkShift][handle & (ChunkSize - 1)];

    /// <summary>A zeroed item, or -1 if no memory could be had (the batch then ends, as in Linux).</summary>
    public int Allocate()
    {
        int handle = _freeHead;
        if (handle < 0)
        {
            try
            {
                if (_chunkCount == _chunks.Length)
                    Array.Resize(ref _chunks, _chunks.Length * 2);
                var chunk = new KsmRmapItem[ChunkSize];
                int start = _chunkCount * ChunkSize;
                // Thread the new chunk onto the free list, lowest handle first.
                for (int i = 0; i < ChunkSize; i++)
                    chunk[i].Next = i + 1 < ChunkSize ? start + i + 1 : -1;
                _chunks[_chunkCount++] = chunk;
                handle = start;
            }
            catch (OutOfMemoryException)
            {
                return -1;
            }
        }
        ref KsmRmapItem item = ref this[handle];
        _freeHead = item.Next;
        item = default;
        item.Next = item.HashNext = item.HashPrev = item.Node = -1;
        Count++;
        return handle;
    }

    public void Free(int handle)
    {
        ref KsmRmapItem item = ref this[handle];
        item = default;
        item.Node = -1;
        item.Next = _freeHead;
        _freeHead = handle;
        Count--;
    }
}

/// <summary>What a stable node is (Linux tells them apart by rmap_hlist_len and head).</summary>
internal enum KsmNodeKind
{
    /// <summary>A KSM page in the index, with its mappings' items.</summary>
    Regular,

    /// <summary>max_page_sharing: the index entry for a content with several KSM copies (dups).</summary>
    Chain,

    /// <summary>One KSM copy inside a chain.</summary>
    Dup,
}

/// <summary>
/// ksm_stable_node: one KSM page (or a chain of copies of one content). It names its page by frame
/// number and holds no reference to it: every use checks that the frame's mapping word still names this
/// node (the "keyhole" check), and a node whose page went away is removed then. The mutable fields are
/// protected by the KSM thread mutex, Hlist also by the KSM page's lock (see each field).
/// </summary>
internal sealed class KsmStableNode
{
    public KsmStableNode(long handle, int index, KsmNodeKind kind, ulong key, ushort domain, int nid)
    {
        Handle = handle;
        Index = index;
        Kind = kind;
        Key = key;
        Domain = domain;
        Nid = nid;
    }

    /// <summary>Immutable: the handle in the KSM page's mapping word (handle &lt;&lt; 2 | KSM).</summary>
    public long Handle { get; }

    /// <summary>Immutable: the node's slot in the KSM node table (what rmap items store).</summary>
    public int Index { get; }

    /// <summary>Regular, chain or dup. Protected by the thread mutex.</summary>
    public KsmNodeKind Kind;

    /// <summary>Immutable: the index key (domain-keyed content checksum).</summary>
    public ulong Key { get; }

    /// <summary>Immutable: the dedupe domain.</summary>
    public ushort Domain { get; }

    /// <summary>The tree (NUMA node with merge_across_nodes = 0, else 0) it is filed in. Protected by the thread mutex.</summary>
    public int Nid;

    /// <summary>The KSM page's frame (not for a chain). Written under the thread mutex when the node is made,
    /// and by the migrator (Ksm.MigratePage) under the page locks of the old and new frames, with a barrier
    /// before the old frame stops naming the node; read without a lock, then re-validated (keyhole check).</summary>
    public long Kpfn = -1;

    /// <summary>Head of the items mapping the page (rmap hlist). Protected by the KSM page's lock.</summary>
    public int Hlist = -1;

    /// <summary>rmap_hlist_len: items on the list. Protected by the thread mutex.</summary>
    public int HlistLen;

    /// <summary>Merges queued in the current batch that will add to this node. Protected by the thread mutex.</summary>
    public int Reserved;

    /// <summary>Created by a merge of the current batch that has not been committed yet. Protected by the thread mutex.</summary>
    public bool Pending;

    /// <summary>For a pending node: its pair passed the batch's write-protect step. Protected by the thread mutex.</summary>
    public bool PendingOk;

    /// <summary>Removed from the index: every later use must treat it as gone. Set under the thread mutex.</summary>
    public bool Dead;

    /// <summary>
    /// On the migrate_nodes list (merge_across_nodes = 0): out of every index, its page moved to another
    /// NUMA node, waiting for the scanner to re-home it (Linux: head == &amp;migrate_nodes). Protected by the thread mutex.
    /// </summary>
    public bool Migrating;

    /// <summary>
    /// Set by the migrator (Ksm.MigratePage, under the page lock only) when the page moved to another
    /// NUMA node; cleared when the scanner re-homes the node. It licenses a node to sit in another node's
    /// index until the scanner meets it (the audit). Read and written with Volatile.
    /// </summary>
    public bool MovedAcrossNodes;

    /// <summary>For a chain: its dups, the preferred one first. Protected by the thread mutex.</summary>
    public List<KsmStableNode>? Dups;

    /// <summary>For a dup: the chain it belongs to. Protected by the thread mutex.</summary>
    public KsmStableNode? Chain;

    /// <summary>For a chain: when its dups were last pruned (Environment.TickCount64). Protected by the thread mutex.</summary>
    public long ChainPruneTime;

    public ulong MappingWord => ((ulong)Handle << 2) | Memory.PageDescriptor.MappingKsm;
}

/// <summary>ksm_mm_slot: an address space registered with KSM, on the scan list.</summary>
internal sealed class KsmMmSlot
{
    public KsmMmSlot(AddressSpace? mm, int index)
    {
        Mm = mm!;
        Index = index;
        Next = Prev = this;
    }

    /// <summary>Immutable: the registered address space.</summary>
    public AddressSpace Mm { get; }

    /// <summary>Immutable: the slot's index (what rmap items store).</summary>
    public int Index { get; }

    /// <summary>Head of the mm's items, sorted by address; -1 if none. Protected by the thread mutex.</summary>
    public int RmapList = -1;

    /// <summary>The scan list (circular, through the head sentinel). Protected by the mm-list lock.</summary>
    public KsmMmSlot Next, Prev;
}

/// <summary>The KSM counters of the whole machine, as /sys/kernel/mm/ksm shows them.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="PagesShared">KSM pages in use (with at least one linked mapping).</param>
/// <param name="PagesSharing">further mappings of them: the pages saved.</param>
/// <param name="PagesUnshared">pages in the unstable index (seen twice unchanged, no partner yet).</param>
/// <param name="PagesVolatile">scanned pages that changed too fast, or wait for their second visit.</param>
/// <param name="PagesScanned">pages examined (pages_scanned).</param>
/// <param name="PagesSkipped">pages smart_scan skipped.</param>
/// <param name="FullScans">completed passes over every registered address space.</param>
/// <param name="StableNodeChains">chains (contents with several KSM copies, max_page_sharing).</param>
/// <param name="StableNodeDups">KSM copies inside chains.</param>
/// <param name="KsmZeroPages">mappings KSM replaced by the zero page (use_zero_pages).</param>
/// <param name="RmapItems">rmap items: one per scanned page.</param>
/// <param name="GeneralProfit">(pages_sharing + ksm_zero_pages) x 4096 - rmap_items x sizeof(rmap_item), bytes.</param>
/// <param name="CowKsm">write faults that copied a KSM page (vmstat cow_ksm).</param>
/// <param name="MetadataBytes">what KSM's own structures hold now, bytes.</param>
public sealed record KsmStats(
    long PagesShared, long PagesSharing, long PagesUnshared, long PagesVolatile, long PagesScanned,
    long PagesSkipped, long FullScans, long StableNodeChains, long StableNodeDups, long KsmZeroPages,
    long RmapItems, long GeneralProfit, long CowKsm, long MetadataBytes);

/// <summary>One process's KSM counters, as /proc/pid/ksm_stat shows them.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="RmapItems">ksm_rmap_items.</param>
/// <param name="ZeroPages">ksm_zero_pages.</param>
/// <param name="MergingPages">ksm_merging_pages: its mappings of KSM pages that KSM has linked.</param>
/// <param name="ProcessProfit">(merging + zero pages) x 4096 - rmap_items x sizeof(rmap_item), bytes.</param>
/// <param name="MergeAny">ksm_merge_any: process-wide merging (PR_SET_MEMORY_MERGE).</param>
/// <param name="Mergeable">ksm_mergeable: some VMA is VM_MERGEABLE.</param>
public sealed record ProcessKsmStats(long RmapItems, long ZeroPages, long MergingPages, long ProcessProfit, bool MergeAny, bool Mergeable);
