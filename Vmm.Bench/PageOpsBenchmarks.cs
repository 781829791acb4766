// In-cache microbenchmarks of the PageOps kernels, each beside its BCL counterpart (the baseline of its
// category) on one page pair. For the out-of-cache picture run `scenario pageops`.
//
//   dotnet run -c Release --project Vmm.Bench -- --filter '*PageOps*'
using System.Numerics;
using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using Vmm.Native;

namespace Vmm.Bench;

[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
public unsafe class PageOpsBenchmarks
{
    private const int PageSize = PageOps.PageSize;

    private byte* _src;
    private byte* _dst;
    private byte* _zero;

    [GlobalSetup]
    public void Setup()
    {
        _src = (byte*)NativeMemory.AlignedAlloc(PageSize, PageSize);
        _dst = (byte*)NativeMemory.AlignedAlloc(PageSize, PageSize);
        _zero = (byte*)NativeMemory.AlignedAlloc(PageSize, PageSize);
        new Random(42).NextBytes(new Span<byte>(_src, PageSize));
        // Equal pages, so the comparisons read both pages to the end.
        Buffer.MemoryCopy(_src, _dst, PageSize, PageSize);
        new Span<byte>(_zero, PageSize).Clear();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        NativeMemory.AlignedFree(_src);
        NativeMemory.AlignedFree(_dst);
        NativeMemory.AlignedFree(_zero);
    }

    // --- Copy -----------------------------------------------------------------------------------------

    [Benchmark(Baseline = true), BenchmarkCategory("Copy")]
    public void BufferMemoryCopy() => Buffer.MemoryCopy(_src, _dst, PageSize, PageSize);

    [Benchmark, BenchmarkCategory("Copy")]
    public void Copy() => PageOps.Copy(_dst, _src);

    // --- PageEquals -----------------------------------------------------------------------------------

    [Benchmark(Baseline = true), BenchmarkCategory("Equals")]
    public bool SequenceEqual() =>
        new ReadOnlySpan<byte>(_src, PageSize).SequenceEqual(new ReadOnlySpan<byte>(_dst, PageSize));

    [Benchmark, BenchmarkCategory("Equals")]
    public bool PageEquals() => PageOps.PageEquals(_src, _dst);

    // --- Compare --------------------------------------------------------------------------------------

    [Benchmark(Baseline = true), BenchmarkCategory("Compare")]
    public int SequenceCompareTo() =>
        new ReadOnlySpan<byte>(_src, PageSize).SequenceCompareTo(new ReadOnlySpan<byte>(_dst, PageSize));

    [Benchmark, BenchmarkCategory("Compare")]
    public int Compare() => PageOps.Compare(_src, _dst);

    // --- IsZero ---------------------------------------------------------------------------------------

    [Benchmark(Baseline = true), BenchmarkCategory("IsZero")]
    public bool IndexOfAnyExcept() => new ReadOnlySpan<byte>(_zero, PageSize).IndexOfAnyExcept((byte)0) < 0;

    [Benchmark, BenchmarkCategory("IsZero")]
    public bool IsZero() => PageOps.IsZero(_zero);

    // --- Zero -----------------------------------------------------------------------------------------

    [Benchmark(Baseline = true), BenchmarkCategory("Zero")]
    public void SpanClear() => new Span<byte>(_dst, PageSize).Clear();

    [Benchmark, BenchmarkCategory("Zero")]
    public void Zero() => PageOps.Zero(_dst);

    // --- Checksum -------------------------------------------------------------------------------------

    /// <summary>One dependent CRC32C chain over the page: what the interleaved streams improve on.</summary>
    [Benchmark(Baseline = true), BenchmarkCategory("Checksum")]
    public uint Crc32CSingleStream()
    {
        ulong* w = (ulong*)_src;
        uint crc = 0xFFFF_FFFFu;
        for (int i = 0; i < PageSize / sizeof(ulong); i++)
            crc = BitOperations.Crc32C(crc, w[i]);
        return ~crc;
    }

    [Benchmark, BenchmarkCategory("Checksum")]
    public uint Checksum() => PageOps.Checksum(_src);
}
