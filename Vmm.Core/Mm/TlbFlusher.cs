// TlbFlusher: one machine's deferred puts and the flush that releases them (Linux's mmu_gather: the
// pages whose PTEs were cleared are freed only after the TLB flush).
//
// A mechanism that unmaps or replaces a frame other threads may still be reading through a translation
// cached before the PTE changed (munmap, a copy-on-write break, a KSM merge, shmem teardown) must not
// drop its last reference at once: the frame could be reused while a reader still copies from it. It
// queues the reference here (DeferPutPage) instead; Flush runs the shootdown (TlbShootdown.Flush: no
// thread still uses a translation that existed before) and only then drops every reference queued before
// it. Queued references are batched: a flush runs by itself once enough are queued, and the mechanisms
// that flush anyway release them with their own flush. munmap and exit do not queue here: they collect
// their frames in a list of their own and put them after their one flush (AddressSpace.FlushAndRelease).
//
// Locking: the deferred list is protected by a private lock, held only to add to it or to swap it out;
// the shootdown and the puts run outside it (a flush waits for other threads, and a put may free).

namespace Vmm.Mm;

/// <summary>The deferred puts of one machine and the TLB flush that releases them. Owned by <see cref="Machine"/>.</summary>
internal sealed class TlbFlusher
{
    private readonly Machine _machine;
    private readonly Lock _deferredLock = new();
    private List<long> _deferredPuts = [];

    public TlbFlusher(Machine machine) => _machine = machine;

    /// <summary>
    /// Drops a reference after the next TLB flush: for a frame other threads may still be reading
    /// through translations cached before its PTE changed. Batched: the flush runs once 64 are queued.
    /// </summary>
    public void DeferPutPage(long pfn) => DeferPutPage(pfn, 64);

    /// <summary>
    /// DeferPutPage with a larger batch, for a caller that flushes often anyway (the KSM scanner flushes
    /// once per merge batch, which releases these too): a flush runs only once <paramref name="flushAt"/>
    /// references are queued.
    /// </summary>
    public void DeferPutPage(long pfn, int flushAt)
    {
        bool flush;
        lock (_deferredLock)
        {
            _deferredPuts.Add(pfn);
            flush = _deferredPuts.Count >= flushAt;
        }
        if (flush)
            Flush();
    }

    /// <summary>The TLB shootdown, then the release of every deferred reference queued before it.</summary>
    public void Flush()
    {
        List<long> ready;
        lock (_deferredLock)
        {
            ready = _deferredPuts;
            _deferredPuts = [];
        }
        TlbShootdown.Flush();
        foreach (long pfn in ready)
            _machine.PutPage(pfn);
    }

    /// <summary>Frames whose last references wait for a flush.</summary>
    public int DeferredPutCount
    {
        get
        {
            lock (_deferredLock)
                return _deferredPuts.Count;
        }
    }
}
