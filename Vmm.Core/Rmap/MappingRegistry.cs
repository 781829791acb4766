// MappingRegistry: handle -> object for the objects a frame's mapping word names (Linux stores a
// pointer there; a descriptor in unmanaged memory cannot hold a managed reference, so it holds a handle).
//
// Locking: none of its own: a ConcurrentDictionary and an atomic handle counter, so faults, rmap walkers
// and KSM look handles up without a lock. A handle is registered before any mapping word names it and
// unregistered when its object dies (the last chain of an anon_vma, a shmem object's Release, a stable
// node's removal).
using System.Collections.Concurrent;

namespace Vmm.Rmap;

/// <summary>
/// The objects a frame's mapping word can name (anon_vma, shmem object, KSM stable node, owner of
/// non-LRU movable pages), by handle. Handles are never reused, so a stale mapping word of a freed page
/// can name only a missing object, never a different one.
/// </summary>
internal sealed class MappingRegistry
{
    private readonly ConcurrentDictionary<long, object> _objects = new();
    private long _next;

    public long NewHandle() => Interlocked.Increment(ref _next);

    public void Register(long handle, object value)
    {
        if (!_objects.TryAdd(handle, value))
            throw new VmBugException($"mapping handle {handle} registered twice");
    }

    public void Unregister(long handle) => _objects.TryRemove(handle, out _);

    public T? Find<T>(long handle) where T : class => _objects.TryGetValue(handle, out object? value) ? value as T : null;

    public int Count => _objects.Count;

    /// <summary>The registered objects of type <typeparamref name="T"/> with their handles (a racy snapshot; for Audit).</summary>
    public IEnumerable<(long Handle, T Value)> All<T>() where T : class
    {
        foreach ((long handle, object value) in _objects)
            if (value is T typed)
                yield return (handle, typed);
    }
}
