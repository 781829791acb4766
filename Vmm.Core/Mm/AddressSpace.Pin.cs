// pin_user_pages and the pagemap (see PinnedMemory.cs).
//
// Locking: the mmap_lock for read; a pin's reference and PinCount are taken under the pte lock of the
// PTE it pins through, where the copy-on-write reuse check, KSM's write-protect and the migrator look.
// Unpinning takes no lock (atomic).
using Vmm.Memory;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    private static readonly PagemapEntry NotPresent = new(false, -1, -1, false, false, false, false, false, false, false, 0, 0);

    /// <summary>
    /// pin_user_pages: pins every page of the range. The range is validated before anything is allocated
    /// (zero or wrapping length, or more pages than a pin can hold: ArgumentOutOfRangeException; an
    /// exited process: InvalidOperationException; a start at or above TASK_SIZE: SegmentationFault), and the
    /// frame list grows with the pages really pinned, so a huge length over a small mapping costs only
    /// what it pins before it faults. Throws SegmentationFault like an access would, or
    /// InsufficientMemoryException when out of frames; pins nothing then.
    /// </summary>
    public PinnedMemory Pin(ulong address, ulong length, bool write)
    {
        ulong pageCount = CheckPinRange(address, length, write);
        // Grows with the pages pinned: never sized by the length alone (see the summary).
        var frames = new List<long>((int)Math.Min(pageCount, 64));
        PinRange(address, length, write, frames);
        return new PinnedMemory(_machine, address, length, [.. frames], write, longTerm: false);
    }

    /// <summary>
    /// Validates a range to pin (see <see cref="Pin(ulong, ulong, bool)"/>).
    /// </summary>
    /// <returns>the number of pages it spans.</returns>
    private ulong CheckPinRange(ulong address, ulong length, bool write)
    {
        ArgumentOutOfRangeException.ThrowIfZero(length);
        if (address < TaskSize && length - 1 > ulong.MaxValue - address)
            throw new ArgumentOutOfRangeException(nameof(length), length, $"0x{address:x} + {length} wraps past 2^64");
        CheckUserRange(address, length, write);
        ulong first = address & ~PageMask;
        ulong last = (address + length - 1) & ~PageMask;
        ulong pageCount = ((last - first) >> PageShift) + 1;
        if (pageCount > (ulong)Array.MaxLength)
            throw new ArgumentOutOfRangeException(nameof(length), length, $"a pin holds at most {Array.MaxLength} pages");
        return pageCount;
    }

    /// <summary>
    /// __get_user_pages with FOLL_PIN: faults in and pins every page of a checked range, appending each
    /// pinned frame to <paramref name="frames"/> (empty on entry). On an exception every page it pinned is
    /// unpinned again and <paramref name="frames"/> is left empty.
    /// </summary>
    private void PinRange(ulong address, ulong length, bool write, List<long> frames)
    {
        ulong first = address & ~PageMask;
        ulong last = (address + length - 1) & ~PageMask;
        try
        {
            // The first page is faulted at the address itself, so a SegmentationFault there names the first
            // byte of the range (as an access's does), not the page start below it.
            for (ulong va = first; va <= last; va += PageSize)
                frames.Add(PinOne(va == first ? address : va, write));
        }
        catch
        {
            UnpinAll(frames);
            throw;
        }
    }

    /// <summary>unpin_user_pages of a list the caller owns; empties it.</summary>
    private void UnpinAll(List<long> frames)
    {
        foreach (long pfn in frames)
            Unpin(pfn);
        frames.Clear();
    }

    private void Unpin(long pfn)
    {
        Interlocked.Decrement(ref _machine.MemMap[pfn].PinCount);
        _machine.PutPage(pfn);
    }

    private long PinOne(ulong va, bool write)
    {
        while (true)
        {
            FaultResult result = TryHandleFault(va, write, unshare: !write);
            if (result != FaultResult.Done)
                throw FaultException(va, write, result);
            MmapLock.EnterReadLock();
            try
            {
                ulong* slot = FindPte(va, out long ptePfn);
                if (slot == null)
                    continue;
                LockPte(ptePfn);
                try
                {
                    var pte = new Pte(Volatile.Read(ref *slot));
                    bool ready = pte.IsPresent && !pte.IsSpecial && (pte.Value & Pte.UserBit) != 0 && (!write || pte.IsWrite);
                    if (!ready)
                        continue; // migrated, zapped or write-protected meanwhile: fault again
                    VmaFlags flags = VmaAt(va)?.Flags ?? VmaFlags.None;
                    bool exclusiveOrShared = (flags & VmaFlags.Shared) != 0 || _machine.MemMap.TestFlag(pte.Pfn, PageFlags.AnonExclusive);
                    if (!exclusiveOrShared)
                        continue;
                    // Under the pte lock, as the copy-on-write reuse check and the migrator's verify expect.
                    _machine.MemMap.GetPage(pte.Pfn);
                    Interlocked.Increment(ref _machine.MemMap[pte.Pfn].PinCount);
                    if (write)
                        Interlocked.Or(ref *slot, Pte.DirtyBit | Pte.AccessedBit); // the host writes through the pin
                    return pte.Pfn;
                }
                finally
                {
                    UnlockPte(ptePfn);
                }
            }
            finally
            {
                MmapLock.ExitReadLock();
            }
        }
    }

    /// <summary>
    /// The pagemap entry of one virtual page. An address at or above TASK_SIZE (non-canonical ones
    /// included) has nothing mapped: the not-present entry, as Linux's pagemap read there returns no
    /// entries rather than an error. An exited process: InvalidOperationException.
    /// </summary>
    public PagemapEntry GetPagemap(ulong va)
    {
        ThrowIfExited();
        if (va >= TaskSize)
            return NotPresent; // the walk would ignore bits 47-63
        MmapLock.EnterReadLock();
        try
        {
            ulong* slot = Exited ? null : FindPte(va & ~PageMask, out _);
            var pte = slot == null ? Pte.None : new Pte(Volatile.Read(ref *slot));
            if (pte.IsSwapFormat)
                return new PagemapEntry(false, -1, -1, false, false, !(VmaAt(va)?.IsShared ?? false), false, false, false, true, 0, 0);
            if (!pte.IsPresent)
                return NotPresent;
            long pfn = pte.Pfn;
            MemMap memMap = _machine.MemMap;
            ulong tag = memMap[pfn].Mapping & PageDescriptor.MappingTagMask;
            return new PagemapEntry(true, pfn, _machine.Topology.NodeOf(pfn), pte.IsWrite, pte.IsDirty,
                Anonymous: tag is PageDescriptor.MappingAnon or PageDescriptor.MappingKsm,
                Exclusive: memMap.TestFlag(pfn, PageFlags.AnonExclusive),
                ZeroPage: pte.IsSpecial,
                Ksm: tag == PageDescriptor.MappingKsm,
                Swapped: false,
                MapCount: pte.IsSpecial ? 0 : memMap.MapCount(pfn),
                Pinned: memMap[pfn].PinCount);
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }
}
