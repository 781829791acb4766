// Machine.MemoryFailure: the host's pfn-based memory-failure calls, Linux's
// /sys/devices/system/memory/hard_offline_page and soft_offline_page (which take a physical address;
// these take the frame number). The mechanism is Mm/MemoryFailure.cs; madvise(MADV_HWPOISON /
// MADV_SOFT_OFFLINE) reaches it by virtual address.
//
// Locking: the memory-failure mutex inside the handler; nothing held on entry.
using Vmm.Mm;

namespace Vmm;

public sealed partial class Machine
{
    /// <summary>The memory-failure handler (memory_failure, soft_offline_page) and num_poisoned_pages.</summary>
    internal MemoryFailure MemoryFailure { get; }

    /// <summary>
    /// hard_offline_page (memory_failure): treats frame <paramref name="pfn"/> as corrupted by the
    /// hardware. A free frame is taken out of the allocator; a page in use is poisoned: every mapping of
    /// it, in every process, becomes a hwpoison entry (an access there throws <see cref="BusError"/>),
    /// and the frame is retired, never to be handed out again. Counted in
    /// <see cref="MachineStats.PoisonedPages"/> / <see cref="MachineStats.HardwareCorruptedBytes"/>.
    /// </summary>
    /// <returns>None; ENXIO: no such frame (or its memory block is offline); EHWPOISON: poisoned already; EBUSY: a frame Vmm does not
    /// poison (the zero page, a page table or other kernel frame, a KSM page, a page isolated by a
    /// migration under way), a free frame that kept being allocated under the call, or a page still
    /// referenced elsewhere after it was unmapped (a pin: it stays poisoned, and is retired when the pin goes).</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno HardOfflinePage(long pfn)
    {
        using MachineCall call = EnterCall();
        if (!Topology.IsValidPfn(pfn))
            return Errno.ENXIO;
        // get_online_mems: no block goes offline or online under the call (pfn_to_online_page).
        Hotplug.GetOnlineMems();
        try
        {
            if (!Allocator.IsPfnOnline(pfn))
                return Errno.ENXIO; // memory_failure: no online page there
            return MemoryFailure.HardOffline(pfn, countIncreased: false, current: null);
        }
        finally
        {
            Hotplug.PutOnlineMems();
        }
    }

    /// <summary>
    /// soft_offline_page: takes frame <paramref name="pfn"/> out of use without losing anything. A page
    /// in use moves to a new frame (contents, mappings and sharing kept; the processes do not notice) and
    /// the old frame is retired; a free frame is taken out of the allocator. Counted in
    /// <see cref="MachineStats.PoisonedPages"/>.
    /// </summary>
    /// <returns>None (also for a frame retired already); ENXIO: no such frame; EIO: a frame of an offline
    /// memory block, or a frame in use that
    /// is not a user page on an LRU list (the zero page, a page table); EBUSY: the page could not be
    /// isolated or moved (pinned, say), or a free frame kept being allocated under the call; ENOMEM: no
    /// frame to move it to.</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SoftOfflinePage(long pfn)
    {
        using MachineCall call = EnterCall();
        if (!Topology.IsValidPfn(pfn))
            return Errno.ENXIO;
        Hotplug.GetOnlineMems();
        try
        {
            if (!Allocator.IsPfnOnline(pfn))
                return Errno.EIO; // soft_offline_page: pfn_to_online_page found nothing
            return MemoryFailure.SoftOffline(pfn, countIncreased: false);
        }
        finally
        {
            Hotplug.PutOnlineMems();
        }
    }
}
