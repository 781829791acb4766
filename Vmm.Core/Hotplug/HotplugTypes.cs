// The public vocabulary of memory hotplug: the notifier chain's events and payload (Linux's
// include/linux/memory.h: MEM_ONLINE ... MEM_CANCEL_OFFLINE, struct memory_notify), what an offline
// reports (result, progress) and why a block cannot go (OfflineBlocker, beyond Linux).
namespace Vmm;

/// <summary>The events of the memory notifier chain, with Linux's values (include/linux/memory.h).</summary>
public enum MemoryNotifierEvent
{
    /// <summary>MEM_ONLINE: the block is online; its memory can be allocated.</summary>
    Online = 1,
    /// <summary>MEM_GOING_OFFLINE: the block is about to be emptied; a callback may veto by returning an error.</summary>
    GoingOffline = 2,
    /// <summary>MEM_OFFLINE: the block is offline; nothing in it is used any more.</summary>
    Offline = 4,
    /// <summary>MEM_GOING_ONLINE: the block is about to come online; a callback may veto by returning an error.</summary>
    GoingOnline = 8,
    /// <summary>MEM_CANCEL_ONLINE: an online was vetoed or failed; undo what GOING_ONLINE prepared.</summary>
    CancelOnline = 0x10,
    /// <summary>MEM_CANCEL_OFFLINE: an offline was vetoed, failed or cancelled; the block stays online.</summary>
    CancelOffline = 0x20,
}

/// <summary>The payload of a memory notifier event (Linux's struct memory_notify).</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="StartPfn">first frame of the block.</param>
/// <param name="PageCount">frames of the block.</param>
/// <param name="StatusChangeNode">the node that gains its first memory (online) or loses its last
/// (offline) with this block, or -1 if no node changes state.</param>
public readonly record struct MemoryNotification(long StartPfn, long PageCount, int StatusChangeNode);

/// <summary>
/// A memory notifier callback (Linux's notifier_block for register_memory_notifier). It runs on the thread
/// that changes the block's state, under the machine's hotplug lock: it must not change a block's state
/// itself (that throws <see cref="InvalidOperationException"/>).
/// </summary>
/// <remarks>Callbacks are called one at a time (the hotplug lock serialises the changes), but on whatever
/// thread changes a block's state: a callback that shares state with other threads must be thread-safe.</remarks>
/// <param name="action">the event.</param>
/// <param name="notification">the block.</param>
/// <returns><see cref="Errno.None"/>; any other value from a GOING_ event vetoes the change (the caller
/// gets that error and every callback hears the CANCEL event); from other events it is ignored.</returns>
public delegate Errno MemoryNotifier(MemoryNotifierEvent action, MemoryNotification notification);

/// <summary>Why a frame keeps a memory block from going offline.</summary>
public enum OfflineBlockReason
{
    /// <summary>A page that migration can never move: a page table or another unmovable allocation in ZONE_NORMAL.</summary>
    Unmovable,
    /// <summary>A reserved frame (the shared zero page).</summary>
    Reserved,
    /// <summary>Pinned (pin_user_pages): migration must wait until the pin is released.</summary>
    Pinned,
    /// <summary>Held by references that neither its mappings nor a pin explain (a call in progress, another migration).</summary>
    Busy,
    /// <summary>In use but on no LRU list, so it cannot be isolated (being set up or torn down).</summary>
    NotIsolatable,
    /// <summary>No free frame outside the block to move the page to.</summary>
    NoMemory,
    /// <summary>A memory notifier callback vetoed the offline (no frame).</summary>
    NotifierVeto,
    /// <summary>The block is not online (a dry run of an offline or going-offline block; no frame).</summary>
    NotOnline,
    /// <summary>A frame of a live <see cref="ContiguousBuffer"/> (<see cref="Machine.AllocateContiguous(long, int, CancellationToken)"/>): unmovable until the buffer is disposed.</summary>
    ContiguousBuffer,
    /// <summary>A non-LRU movable page (<see cref="MovableOperations"/>) whose owner refused to isolate it, or failed its migration.</summary>
    MovableRefused,
}

/// <summary>One frame that keeps a memory block from going offline, and why (beyond Linux: its offline says only EBUSY).</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Pfn">the frame, or -1 when the reason is not a frame (a notifier veto).</param>
/// <param name="Reason">why.</param>
/// <param name="Pid">a process that maps the frame, or -1.</param>
/// <param name="Address">the address where that process maps it (valid when <paramref name="Pid"/> is not -1).</param>
/// <param name="Description">one line a person can act on.</param>
public sealed record OfflineBlocker(long Pfn, OfflineBlockReason Reason, int Pid, ulong Address, string Description)
{
    /// <inheritdoc/>
    public override string ToString() => Description;
}

/// <summary>How far an offline has come (reported after each migration step).</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Pass">the pass over the block (1 for the first).</param>
/// <param name="PagesMoved">pages migrated out of the block so far.</param>
/// <param name="PagesLeft">frames of the block still in use (racy: other threads keep running).</param>
/// <param name="Frames">frames of the block.</param>
public readonly record struct OfflineProgress(int Pass, long PagesMoved, long PagesLeft, long Frames);

/// <summary>What an offline did.</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Error"><see cref="Errno.None"/> when the block is offline; EINVAL (not online), EBUSY
/// (an unmovable page, or the passes ran out), EINTR (cancelled), ENOMEM (nowhere to move a page), or a
/// notifier's veto. On any error the block is online again, as it was.</param>
/// <param name="Blockers">on failure, frames that kept the block (at most <see cref="MemoryHotplug.MaxBlockersReported"/>), and why.</param>
/// <param name="PagesMoved">pages migrated out of the block (they stay moved on failure).</param>
/// <param name="Passes">passes over the block.</param>
/// <param name="Elapsed">time from the call to its return.</param>
public sealed record OfflineResult(Errno Error, IReadOnlyList<OfflineBlocker> Blockers, long PagesMoved, int Passes, TimeSpan Elapsed)
{
    /// <summary>True if the block went offline.</summary>
    public bool Succeeded => Error == Errno.None;
}
