// The NUMA calls of a process that move memory: move_pages and migrate_pages. The work is in
// Migration/PageMoves.cs; here the public face, with what each call may answer.
//
// Locking: none of its own (see PageMoves.cs).
using Vmm.Migration;

namespace Vmm;

public sealed partial class VmProcess
{
    /// <summary>
    /// move_pages, called by this process: moves each page of <paramref name="pages"/> in process
    /// <paramref name="pid"/> (0: this process) to the node in the same position of
    /// <paramref name="nodes"/>, or, when <paramref name="nodes"/> is null, only reports where each page is.
    /// Each page's outcome goes into <paramref name="status"/>: its node (after the move, or where it
    /// already was), or a negative errno: -ENOENT (nothing mapped there yet, or the zero page), -EFAULT
    /// (no mapping at the address), -EACCES (mapped more than once and <see cref="MovePolicyFlags.MoveAll"/>
    /// not given), -EBUSY (pinned, or in use by another mechanism through every pass), -ENOMEM (no free
    /// frame on the node), -EINVAL (a kind of page that does not migrate).
    /// </summary>
    /// <remarks>
    /// Whole-call errors change nothing: EINVAL (a flag other than Move and MoveAll); EPERM (MoveAll
    /// without CAP_SYS_NICE, or another user's process: see <see cref="Credentials.MayMovePagesOf"/>);
    /// ESRCH (no such process); EINVAL (the process is exiting); EFAULT (<paramref name="status"/> or
    /// <paramref name="nodes"/> shorter than <paramref name="pages"/>: the kernel would fault on the
    /// user's array); ENODEV (a node the machine does not have); EACCES (a node the target may not use).
    /// Unlike Linux, all nodes are checked before any page moves, and a page that could not be migrated
    /// shows in its status (-EBUSY, -ENOMEM) instead of in a positive return: the call returns None
    /// once it has handled every page. The credentials are this process's at the time of the call.
    /// </remarks>
    /// <param name="pid">the process whose pages move; 0 for this one.</param>
    /// <param name="pages">addresses in that process (any address within a page names the page).</param>
    /// <param name="nodes">the node for each page, or null to only report.</param>
    /// <param name="status">receives each page's node or negative errno; at least as long as <paramref name="pages"/>.</param>
    /// <param name="flags">Move (the default: pages mapped only by the target) or MoveAll (also pages
    /// other processes map; needs CAP_SYS_NICE).</param>
    /// <exception cref="ArgumentNullException"><paramref name="pages"/> or <paramref name="status"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno MovePages(int pid, ulong[] pages, int[]? nodes, int[] status, MovePolicyFlags flags = MovePolicyFlags.Move)
    {
        ArgumentNullException.ThrowIfNull(pages);
        ArgumentNullException.ThrowIfNull(status);
        using MachineCall call = Machine.EnterCall();
        return PageMoves.MovePages(this, pid, pages, nodes, status, flags);
    }

    /// <summary>
    /// migrate_pages, called by this process: moves every page of process <paramref name="pid"/> (0:
    /// this process) that lies on a node of <paramref name="oldNodes"/> to the node in the same position
    /// of <paramref name="newNodes"/> (Linux's node_remap: the n-th old node goes to the n-th new node,
    /// wrapping when there are fewer new nodes; when the masks differ in size, a node in both keeps its
    /// pages). Pages mapped by more than one mapping move only when this process has CAP_SYS_NICE
    /// (MPOL_MF_MOVE_ALL); otherwise they stay and are not counted.
    /// </summary>
    /// <returns>None (<paramref name="notMoved"/>: the pages that could not be moved: pinned or busy);
    /// EINVAL (an empty mask, a node the machine does not have, no new node this process may use, or the
    /// target is exiting); ESRCH (no such process); EPERM (another user's process without CAP_SYS_NICE,
    /// or new nodes outside the target's allowed nodes without it); ENOMEM (a destination node ran out of
    /// frames: the moves stopped there, <paramref name="notMoved"/> counts the failures before).</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno MigratePages(int pid, NodeMask oldNodes, NodeMask newNodes, out long notMoved)
    {
        using MachineCall call = Machine.EnterCall();
        return PageMoves.MigratePages(this, pid, oldNodes, newNodes, out notMoved);
    }
}
