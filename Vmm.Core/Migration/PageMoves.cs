// PageMoves: the calls that move a process's pages between nodes when a user asks: move_pages (Linux's
// kernel_move_pages, with do_pages_stat for a report and do_pages_move for a move, mm/migrate.c) and
// migrate_pages (kernel_migrate_pages and do_migrate_pages, mm/mempolicy.c).
//
// move_pages, in Linux's order: flags (EINVAL), MOVE_ALL without CAP_SYS_NICE (EPERM), the target
// (ESRCH; EPERM when the caller may not move its pages; EINVAL when it has no mm any more), then the
// arrays. Without nodes each page's node is reported. With nodes, the pages are taken in order and
// gathered in runs that go to the same node (a run ends where the next page goes elsewhere, or at
// 2,048 pages: MaxRun); each page is looked up (add_page_for_migration: -EFAULT no VMA, -ENOENT nothing
// or the zero page, its node when it is there already, -EACCES when it is mapped more than once and
// MOVE_ALL was not given, -EBUSY when it cannot be taken for migration: the isolation of its lookup
// chunk, Lru.IsolateMany, did not take it), and each run is migrated to its node by the engine
// (MigrationEngine.MigratePages, SYNC, MR_SYSCALL, frames allocated on that node only), what did not move
// is put back on its LRU list, and each page's status is the node or why it did not move.
//
// Deliberate differences from Linux, each so that every outcome shows and a failed call changes nothing:
//   - the target nodes are all checked before any page is touched: ENODEV (not a node of the machine)
//     and EACCES (outside the target's allowed nodes) leave every page where it was, where Linux has
//     moved the pages before the bad entry;
//   - a page that could not be migrated gets -EBUSY (or -ENOMEM when no frame could be had on its node)
//     in its status, and the call goes on with the next run, where Linux returns the number of pages
//     not migrated (or -ENOMEM) and leaves the statuses from there on unwritten;
//   - arrays shorter than the page list: EFAULT before anything is done (Linux's copy_from_user /
//     put_user fail where the user's array ends, after the pages before it were handled).
//
// migrate_pages: masks naming a node the machine does not have, or empty (EINVAL), the target (ESRCH,
// EPERM), new nodes outside the target's allowed nodes without CAP_SYS_NICE (EPERM), new nodes none of
// which the caller may use (EINVAL); then do_migrate_pages' pairing of source and destination nodes
// (node_remap keeps the relative layout; a destination that is still a source waits its turn, so memory
// is moved off a node before more is moved onto it). A page mapped more than once is moved only with
// CAP_SYS_NICE (MPOL_MF_MOVE_ALL) and is otherwise skipped without counting as a failure, as Linux 6.7+
// does; a page that could not be taken or moved counts in the result. Linux returns 0 for an empty old
// mask; here it is EINVAL, as the project's semantics say.
//
// Locking: the target's mmap_lock for read while pages are looked up and taken (a reference under the
// pte lock; AddressSpace.MovePages.cs), then isolated from their LRU lists (lru_lock) with the LRU add
// cache disabled for the whole call (lru_cache_disable); the migration itself runs with no lock held,
// on isolated pages. Credentials are read at each check (VmProcess.Credentials takes its lock), so a
// seteuid or capset on another thread is seen by the next call.
using Microsoft.Extensions.ObjectPool;
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Migration;

internal static class PageMoves
{
    /// <summary>DO_PAGES_STAT_CHUNK_NR: a report takes the mmap_lock for this many pages at a time.</summary>
    private const int StatChunk = 16;

    /// <summary>
    /// The most pages move_pages gathers before it migrates them (a run to one node is cut into runs of
    /// this size): the lists stay small enough to be pooled, and the outcome is the same.
    /// </summary>
    private const int MaxRun = 4 * MigrationEngine.MaxBatch;

    private static readonly ObjectPool<MoveContext> Contexts =
        new DefaultObjectPool<MoveContext>(new MoveContextPolicy(), Math.Max(4, Environment.ProcessorCount * 2));

    /// <summary>kernel_move_pages. Preconditions: a machine call is open.</summary>
    public static Errno MovePages(VmProcess caller, int pid, ulong[] pages, int[]? nodes, int[] status, MovePolicyFlags flags)
    {
        if ((flags & ~(MovePolicyFlags.Move | MovePolicyFlags.MoveAll)) != 0)
            return Errno.EINVAL;
        bool moveAll = (flags & MovePolicyFlags.MoveAll) != 0;
        if (moveAll && !caller.Credentials.Has(Capabilities.SysNice))
            return Errno.EPERM;
        Errno error = FindTarget(caller, pid, out VmProcess target);
        if (error != Errno.None)
            return error;
        int count = pages.Length;
        if (status.Length < count || (nodes is not null && nodes.Length < count))
            return Errno.EFAULT;
        if (nodes is null)
        {
            PagesStat(target.Mm, pages, status);
            return Errno.None;
        }
        // node_state(node, N_MEMORY): a node of the machine with memory.
        var withMemory = new NodeMask(caller.Machine.NodesWithMemory);
        NodeMask allowed = MemsAllowed(target);
        for (int i = 0; i < count; i++)
        {
            int node = nodes[i];
            if (!withMemory.Contains(node))
                return Errno.ENODEV;
            if (!allowed.Contains(node))
                return Errno.EACCES;
        }
        PagesMove(target.Mm, pages, nodes, status, moveAll);
        return Errno.None;
    }

    /// <summary>kernel_migrate_pages. Preconditions: a machine call is open.</summary>
    public static Errno MigratePages(VmProcess caller, int pid, NodeMask oldNodes, NodeMask newNodes, out long notMoved)
    {
        notMoved = 0;
        NodeMask machineNodes = NodeMask.FirstNodes(caller.Machine.Topology.NodeCount);
        if (oldNodes.IsEmpty || newNodes.IsEmpty || !oldNodes.IsSubsetOf(machineNodes) || !newNodes.IsSubsetOf(machineNodes))
            return Errno.EINVAL;
        Errno error = FindTarget(caller, pid, out VmProcess target);
        if (error != Errno.None)
            return error;
        if (!newNodes.IsSubsetOf(MemsAllowed(target)) && !caller.Credentials.Has(Capabilities.SysNice))
            return Errno.EPERM;
        newNodes &= MemsAllowed(caller);
        if (newNodes.IsEmpty)
            return Errno.EINVAL;
        bool moveAll = caller.Credentials.Has(Capabilities.SysNice);
        long result = DoMigratePages(target.Mm, oldNodes, newNodes, moveAll, out notMoved);
        return result < 0 ? (Errno)(-result) : Errno.None;
    }

    /// <summary>
    /// find_mm_struct: the process whose pages move. pid 0 (or the caller's own pid) is the caller;
    /// another needs <see cref="Credentials.MayMovePagesOf"/> (ptrace_may_access with the real
    /// credentials).
    /// </summary>
    /// <returns>None; ESRCH (no such process, or it has exited and gone); EPERM; EINVAL (the process is
    /// exiting: it has no mm to move).</returns>
    private static Errno FindTarget(VmProcess caller, int pid, out VmProcess target)
    {
        target = caller;
        if (pid != 0 && pid != caller.Pid)
        {
            VmProcess? found = caller.Machine.FindProcess(pid);
            if (found is null)
                return Errno.ESRCH;
            if (!caller.Credentials.MayMovePagesOf(found.Credentials))
                return Errno.EPERM;
            target = found;
        }
        return target.Mm.Exited ? Errno.EINVAL : Errno.None;
    }

    /// <summary>cpuset_mems_allowed: the nodes the process's cpuset lets it have memory on.</summary>
    private static NodeMask MemsAllowed(VmProcess process) => new(Volatile.Read(ref process.Mm.MemsAllowed));

    /// <summary>do_pages_stat: each page's node, or -EFAULT / -ENOENT.</summary>
    private static void PagesStat(AddressSpace mm, ulong[] pages, int[] status)
    {
        var topology = mm.Machine.Topology;
        for (int start = 0; start < pages.Length; start += StatChunk)
        {
            int end = Math.Min(pages.Length, start + StatChunk);
            mm.MmapLock.EnterReadLock();
            try
            {
                for (int i = start; i < end; i++)
                {
                    Errno error = mm.FollowPageLocked(pages[i], get: false, out long pfn);
                    status[i] = error == Errno.None ? topology.NodeOf(pfn) : -(int)error;
                }
            }
            finally
            {
                mm.MmapLock.ExitReadLock();
            }
        }
    }

    /// <summary>do_pages_move: runs of pages bound for one node, each migrated as one list. Preconditions: every node valid.</summary>
    private static void PagesMove(AddressSpace mm, ulong[] pages, int[] nodes, int[] status, bool moveAll)
    {
        MoveContext context = Contexts.Get();
        // lru_cache_disable: new pages go straight to their lists and the add batches are drained, so a
        // page that is on an LRU can always be isolated (one sitting in a batch could not).
        mm.Machine.Lru.DisableCache();
        try
        {
            context.Machine = mm.Machine;
            int runNode = -1;
            int i = 0;
            while (i < pages.Length)
            {
                if (nodes[i] != runNode || context.RunPages.Count >= MaxRun)
                {
                    MoveRun(context, runNode, status); // with no lock held: the engine may sleep on page locks
                    runNode = nodes[i];
                }
                // Look pages up StatChunk at a time under one hold of the mmap_lock (Linux takes it per page;
                // a read lock round trip per page was a tenth of the call's cost). A chunk ends where the
                // run does, so the migration itself always runs with the lock released.
                int end = Math.Min(pages.Length, i + StatChunk);
                mm.MmapLock.EnterReadLock();
                try
                {
                    for (; i < end && nodes[i] == runNode; i++)
                    {
                        if (AddPageForMigrationLocked(context, mm, pages[i], runNode, moveAll, out int pageStatus))
                            context.Pending.Add(i);
                        else
                            status[i] = pageStatus;
                    }
                    context.IsolatePending(status);
                }
                finally
                {
                    mm.MmapLock.ExitReadLock();
                }
            }
            MoveRun(context, runNode, status);
        }
        finally
        {
            context.ReleaseRun();
            Contexts.Return(context);
            mm.Machine.Lru.EnableCache();
        }
    }

    /// <summary>
    /// add_page_for_migration: looks up the page at <paramref name="va"/> and, if it must and may move,
    /// takes it for migration (on the context's run list).
    /// </summary>
    /// <returns>true when queued; false with <paramref name="status"/> the page's node (already there)
    /// or a negative errno.</returns>
    /// <remarks>Preconditions: the mmap_lock held for read (the isolation's lru_lock nests inside it).</remarks>
    private static bool AddPageForMigrationLocked(MoveContext context, AddressSpace mm, ulong va, int node, bool moveAll, out int status)
    {
        Machine machine = mm.Machine;
        Errno error = mm.FollowPageLocked(va, get: true, out long pfn);
        if (error != Errno.None)
        {
            status = -(int)error;
            return false;
        }
        status = node;
        if (machine.Topology.NodeOf(pfn) == node)
        {
            machine.PutPage(pfn);
            return false;
        }
        if (machine.MemMap.MapCount(pfn) > 1 && !moveAll)
        {
            machine.PutPage(pfn);
            status = -(int)Errno.EACCES;
            return false;
        }
        context.PendingPages.Add(pfn); // isolated with the rest of the chunk (IsolatePending), or -EBUSY
        return true;
    }

    /// <summary>
    /// move_pages_and_store_status: migrates the context's run to <paramref name="node"/> and writes each
    /// page's status (the node, -EBUSY, -ENOMEM, or the migrator's errno). Empties the run.
    /// </summary>
    private static void MoveRun(MoveContext context, int node, int[] status)
    {
        if (context.RunPages.Count == 0)
            return;
        context.MigrateRun(node);
        for (int i = 0; i < context.RunIndexes.Count; i++)
            status[context.RunIndexes[i]] = context.RunResults[i];
        context.RunIndexes.Clear();
    }

    /// <summary>
    /// do_migrate_pages: moves every page of <paramref name="mm"/> on a node of <paramref name="from"/>
    /// to the matching node of <paramref name="to"/>, one (source, destination) pair at a time.
    /// </summary>
    /// <returns>0, or a negative errno (-ENOMEM) when the moves stopped; <paramref name="notMoved"/>: the
    /// pages that could not be taken or moved (up to the stop).</returns>
    internal static long DoMigratePages(AddressSpace mm, NodeMask from, NodeMask to, bool moveAll, out long notMoved)
    {
        notMoved = 0;
        MoveContext context = Contexts.Get();
        mm.Machine.Lru.DisableCache();
        try
        {
            context.Machine = mm.Machine;
            NodeMask pending = from;
            while (!pending.IsEmpty)
            {
                int source = -1, dest = 0;
                foreach (int s in pending.Nodes)
                {
                    // With masks of different sizes the relative layout cannot be kept: a node that is a
                    // destination keeps its pages ([0-7] -> [3,4,5] moves only 0, 1, 2, 6 and 7).
                    if (from.Count != to.Count && to.Contains(s))
                        continue;
                    int d = NodeRemap(s, from, to);
                    if (s == d)
                        continue;
                    source = s;
                    dest = d;
                    // Best: a destination that is no longer a source (its own pages have left).
                    if (!pending.Contains(dest))
                        break;
                }
                if (source < 0)
                    break;
                pending = pending.Without(source);
                long result = MigrateToNode(context, mm, source, dest, moveAll);
                if (result < 0)
                    return result;
                notMoved += result;
            }
            return 0;
        }
        finally
        {
            context.ReleaseRun();
            Contexts.Return(context);
            mm.Machine.Lru.EnableCache();
        }
    }

    /// <summary>
    /// node_remap (bitmap_bitremap): the node of <paramref name="to"/> in the position that
    /// <paramref name="node"/> has in <paramref name="from"/> (wrapping when <paramref name="to"/> is
    /// smaller); <paramref name="node"/> itself when it is not in <paramref name="from"/> or
    /// <paramref name="to"/> is empty.
    /// </summary>
    internal static int NodeRemap(int node, NodeMask from, NodeMask to)
    {
        if (!from.Contains(node) || to.IsEmpty)
            return node;
        int rank = System.Numerics.BitOperations.PopCount(from.Bits & ((1UL << node) - 1));
        return to.NthNode(rank % to.Count);
    }

    /// <summary>migrate_to_node: isolates every page of the mm on <paramref name="source"/> and migrates them to <paramref name="dest"/>.</summary>
    /// <returns>the pages not moved, or -ENOMEM.</returns>
    private static long MigrateToNode(MoveContext context, AddressSpace mm, int source, int dest, bool moveAll)
    {
        Machine machine = mm.Machine;
        List<long> found = context.Found;
        mm.MmapLock.EnterReadLock();
        try
        {
            mm.CollectPagesOnNodeLocked(source, found);
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
        long failed = 0;
        foreach (long pfn in found)
        {
            // A page mapped at several addresses is met once per mapping; a shared page stays without
            // MOVE_ALL, which Linux does not count as a failure (migrate_folio_add).
            if (context.Seen.Contains(pfn) || (!moveAll && machine.MemMap.MapCount(pfn) > 1))
            {
                machine.PutPage(pfn);
                continue;
            }
            if (context.Isolate(pfn))
            {
                context.Seen.Add(pfn); // the walk meets a page once per mapping
                context.RunIndexes.Add(-1);
            }
            else
            {
                failed++;
            }
        }
        found.Clear();
        if (context.RunPages.Count == 0)
            return failed;
        bool outOfMemory = context.MigrateRun(dest);
        foreach (int result in context.RunResults)
        {
            if (result < 0)
                failed++;
        }
        context.RunIndexes.Clear();
        return outOfMemory ? -(int)Errno.ENOMEM : failed;
    }

    /// <summary>A call's work lists (pooled): the run being built and its outcome.</summary>
    private sealed class MoveContext
    {
        /// <summary>The machine of the call under way.</summary>
        public Machine Machine = null!;

        /// <summary>The status index of each page of the run (-1 for migrate_pages, which has none).</summary>
        public readonly List<int> RunIndexes = [];

        /// <summary>The run's pages, each isolated (<see cref="Isolate"/>): the engine's <c>from</c> list.</summary>
        public readonly List<long> RunPages = [];

        /// <summary>The run's pages in status order, while the engine reorders <see cref="RunPages"/>.</summary>
        public readonly List<long> RunOrder = [];

        /// <summary>The node the run goes to: <see cref="Allocate"/> takes frames there only (__GFP_THISNODE).</summary>
        public int TargetNode;

        /// <summary>alloc_migration_target with __GFP_THISNODE: a frame on <see cref="TargetNode"/>, not zeroed; built once per context.</summary>
        public readonly Func<long, long> Allocate;

        /// <summary>After <see cref="MigrateRun"/>: each page's status, in run order.</summary>
        public readonly List<int> RunResults = [];

        /// <summary>Pages met already (migrate_pages' walk, and the run's duplicates).</summary>
        public readonly HashSet<long> Seen = [];

        /// <summary>migrate_pages' walk result, each page referenced.</summary>
        public readonly List<long> Found = [];

        // The allocator closes over the context, not over a call: one delegate per pooled context.
        public MoveContext() =>
            Allocate = _ => Machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, TargetNode);

        /// <summary>
        /// folio_isolate_lru for the run: the page leaves its LRU list and holds the isolation's
        /// reference; the caller's reference is dropped either way. False when the page is not on an LRU
        /// list: already isolated (by this run or another mechanism), or not an LRU page.
        /// Preconditions: the caller holds a reference to <paramref name="pfn"/>; the LRU cache disabled.
        /// </summary>
        public bool Isolate(long pfn)
        {
            bool isolated = Machine.Lru.Isolate(pfn);
            Machine.PutPage(pfn);
            if (!isolated)
                return false;
            RunPages.Add(pfn);
            return true;
        }

        /// <summary>Status indexes of the pages of the chunk being looked up, each referenced, waiting for <see cref="IsolatePending"/>.</summary>
        public readonly List<int> Pending = [];

        /// <summary>The pages of <see cref="Pending"/>, in the same order.</summary>
        public readonly List<long> PendingPages = [];

        /// <summary>
        /// folio_isolate_lru for the chunk just looked up, each lruvec's lock taken once: an isolated page
        /// joins the run, one that is not gets -EBUSY; the lookup's references are dropped either way.
        /// Preconditions: the LRU cache disabled; the mmap_lock held (the lru_lock nests inside it).
        /// </summary>
        public void IsolatePending(int[] status)
        {
            int count = PendingPages.Count;
            if (count == 0)
                return;
            Span<bool> isolated = stackalloc bool[count];
            Machine.Lru.IsolateMany(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(PendingPages), isolated);
            for (int k = 0; k < count; k++)
            {
                long pfn = PendingPages[k];
                Machine.PutPage(pfn);
                if (isolated[k])
                {
                    RunPages.Add(pfn);
                    RunIndexes.Add(Pending[k]);
                }
                else
                {
                    status[Pending[k]] = -(int)Errno.EBUSY;
                }
            }
            Pending.Clear();
            PendingPages.Clear();
        }

        /// <summary>
        /// Migrates the run to <paramref name="node"/> with the engine (SYNC, MR_SYSCALL, frames from that
        /// node only), fills <see cref="RunResults"/> (the node, or -EBUSY, or -ENOMEM once the engine
        /// stopped for want of a frame) and puts back what did not move. Empties <see cref="RunPages"/>.
        /// </summary>
        /// <returns>true when the engine stopped for want of a frame on the node.</returns>
        public bool MigrateRun(int node)
        {
            RunResults.Clear();
            Seen.Clear();
            RunOrder.Clear();
            TargetNode = node;
            MigrationEngine engine = Machine.Migration;
            int count = RunPages.Count;
            RunOrder.AddRange(RunPages);
            int rc = engine.MigratePages(RunPages, Allocate, null, MigrateMode.Sync, MigrateReason.Syscall, out _);
            // RunPages now holds exactly the pages that did not move, still isolated.
            if (RunPages.Count == 0)
            {
                // Every page moved (the common case): no set of failures to consult.
                for (int i = 0; i < count; i++)
                    RunResults.Add(node);
                RunOrder.Clear();
                return false;
            }
            foreach (long pfn in RunPages)
                Seen.Add(pfn);
            int failure = rc == -(int)Errno.ENOMEM ? -(int)Errno.ENOMEM : -(int)Errno.EBUSY;
            foreach (long pfn in RunOrder)
                RunResults.Add(Seen.Contains(pfn) ? failure : node);
            Seen.Clear();
            RunOrder.Clear();
            engine.PutbackMovablePages(RunPages);
            return rc == -(int)Errno.ENOMEM;
        }

        /// <summary>Gives back the pages of a run that was not migrated (an exception on the way) and the walk's pages.</summary>
        public void ReleaseRun()
        {
            foreach (long pfn in RunPages)
                Machine.Lru.Putback(pfn);
            RunPages.Clear();
            Seen.Clear();
            foreach (long pfn in Found)
                Machine.PutPage(pfn);
            Found.Clear();
            foreach (long pfn in PendingPages)
                Machine.PutPage(pfn);
            PendingPages.Clear();
            Pending.Clear();
        }
    }

    private sealed class MoveContextPolicy : IPooledObjectPolicy<MoveContext>
    {
        public MoveContext Create() => new();

        public bool Return(MoveContext context)
        {
            context.Machine = null!;
            context.RunIndexes.Clear();
            context.RunPages.Clear();
            context.RunResults.Clear();
            context.RunOrder.Clear();
            context.Seen.Clear();
            context.Found.Clear();
            context.Pending.Clear();
            context.PendingPages.Clear();
            // A huge call's lists are not kept: the next call grows its own.
            return context.RunPages.Capacity <= 4096 && context.Found.Capacity <= 4096 && context.RunResults.Capacity <= 4096 &&
                context.RunOrder.Capacity <= 4096;
        }
    }
}
