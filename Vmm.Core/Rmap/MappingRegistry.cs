using System.Collections.Concurrent;

namespace Vmm.Rmap;

/// <summary>
/// The objects a frame's mapping word can name (anon_vma, shmem object, later KSM stable nodes and
/// movable-ops owners), by handle. Handles are never reused, so a stale mapping word of a freed page
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
}
