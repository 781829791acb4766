using BenchmarkDotNet.Attributes;
using Vmm.Memory;

namespace Vmm.Bench;

/// <summary>
/// Allocate + free round trips on one thread. Order 0 goes through the per-CPU lists (no zone lock,
/// no split or merge in the steady state); order 9 (2 MiB) takes the zone lock, splits a 4 MiB block
/// and merges it back. NoZero keeps the cost of zeroing out of the allocator figure; the Zeroed
/// variants include it (a 4 KiB page is zeroed on every reuse).
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class AllocatorBenchmarks
{
    private Machine _machine = null!;
    private PageAllocator _allocator = null!;

    [GlobalSetup]
    public void Setup()
    {
        _machine = new Machine(new MachineOptions { NodeCount = 2, NodeSizeBytes = 64L << 20, BlockSizeBytes = 32L << 20, MinFreeKbytes = 0 });
        _allocator = _machine.Allocator;
    }

    [GlobalCleanup]
    public void Cleanup() => _machine.Dispose();

    [Benchmark(Baseline = true)]
    public void Order0_AllocFree()
    {
        long pfn = _allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 0);
        _allocator.FreePages(pfn);
    }

    [Benchmark]
    public void Order0_AllocFree_Zeroed()
    {
        long pfn = _allocator.AllocPages(0, AllocFlags.Movable, 0);
        _allocator.FreePages(pfn);
    }

    [Benchmark(OperationsPerInvoke = 64)]
    public void Order0_Alloc64_Free64()
    {
        Span<long> pages = stackalloc long[64];
        for (int i = 0; i < pages.Length; i++)
            pages[i] = _allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 0);
        for (int i = 0; i < pages.Length; i++)
            _allocator.FreePages(pages[i]);
    }

    [Benchmark]
    public void Order0_Unmovable_AllocFree()
    {
        long pfn = _allocator.AllocPages(0, AllocFlags.NoZero, 0);
        _allocator.FreePages(pfn);
    }

    [Benchmark]
    public void Order9_AllocFree()
    {
        long pfn = _allocator.AllocPages(9, AllocFlags.Movable | AllocFlags.NoZero, 0);
        _allocator.FreePages(pfn, 9);
    }

    [Benchmark]
    public void Order9_Compound_AllocFree()
    {
        long pfn = _allocator.AllocPages(9, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.Compound, 0);
        _allocator.FreePages(pfn, 9);
    }
}
