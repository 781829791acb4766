// The "pageops" scenario: every PageOps kernel over a working set far larger than the caches, so each
// page comes from memory, beside the BCL/libc counterparts over the same pages.
//
//   dotnet run -c Release --project Vmm.Bench -- scenario pageops [--size-mib 256] [--reps 5] [--seed 42]
//
// Two regions of --size-mib MiB (src and dst) are allocated page-aligned. src holds seeded random data.
// Each rep runs every kernel once over all pages, in an order that leaves dst in the state the next
// kernel needs: copy (dst = src), compare/equals/memcmp (equal pages, so the whole page is read),
// checksum (src), zero (dst = 0), iszero (zero pages, so the whole page is read), the candidates
// for faster zeroing and copying (zero with non-temporal stores, libc memset, copy with non-temporal
// stores, libc memcpy: issue 14 asks which primitive is fastest out of cache on each machine kind),
// memcpy (dst = src again). Rounds interleave the kernels so that drift (frequency, neighbours on the host) hits all of
// them alike. One untimed round warms up first; each key is the median ns per 4 KiB page over the reps.
using System.Diagnostics;
using System.Globalization;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

internal sealed unsafe class PageOpsScenario : IScenario
{
    private const int PageSize = PageOps.PageSize;

    private enum Kernel
    {
        Copy,
        Compare,
        Checksum,
        Zero,
        IsZero,
        Memcpy,
        Memcmp,
        Equals,
        CopyNonTemporal,
        ZeroNonTemporal,
        LibcMemcpy,
        LibcMemset,
    }

    // The order of the JSON keys; the run order is RunOrder below.
    private static readonly (Kernel Kernel, string Key)[] Keys =
    [
        (Kernel.Copy, "copy_ns"),
        (Kernel.Compare, "compare_ns"),
        (Kernel.Checksum, "checksum_ns"),
        (Kernel.Zero, "zero_ns"),
        (Kernel.IsZero, "iszero_ns"),
        (Kernel.Memcpy, "memcpy_ns"),
        (Kernel.Memcmp, "memcmp_ns"),
        (Kernel.Equals, "equals_ns"),
        (Kernel.CopyNonTemporal, "copy_nt_ns"),
        (Kernel.ZeroNonTemporal, "zero_nt_ns"),
        (Kernel.LibcMemcpy, "libc_memcpy_ns"),
        (Kernel.LibcMemset, "libc_memset_ns"),
    ];

    private static readonly Kernel[] RunOrder =
    [
        Kernel.Copy, Kernel.Compare, Kernel.Equals, Kernel.Memcmp, Kernel.Checksum, Kernel.Zero, Kernel.IsZero,
        Kernel.ZeroNonTemporal, Kernel.LibcMemset, Kernel.CopyNonTemporal, Kernel.LibcMemcpy, Kernel.Memcpy,
    ];

    private static long _sink;

    public string Name => "pageops";

    public string Description => "PageOps kernels vs memcpy/memcmp per 4 KiB page, out of cache (--size-mib 256 --reps 5 --seed 42)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        int reps = args.GetInt("reps", 5);
        int seed = args.GetInt("seed", 42);
        if (sizeMib <= 0 || reps <= 0)
            throw new ArgumentException("--size-mib and --reps must be positive");

        long pages = (long)sizeMib * 1024 * 1024 / PageSize;
        nuint bytes = (nuint)(pages * PageSize);
        Console.WriteLine($"pageops: {PageOps.Implementation}; 2 x {sizeMib} MiB ({pages} pages each), {reps} reps, seed {seed}");

        byte* src = (byte*)NativeMemory.AlignedAlloc(bytes, PageSize);
        byte* dst = (byte*)NativeMemory.AlignedAlloc(bytes, PageSize);
        try
        {
            var rng = new Random(seed);
            for (long i = 0; i < pages; i++)
                rng.NextBytes(new Span<byte>(src + i * PageSize, PageSize));
            for (long i = 0; i < pages; i++)
                Buffer.MemoryCopy(src + i * PageSize, dst + i * PageSize, PageSize, PageSize);

            // Let the JIT reach its optimized tier on every kernel (the kernels have loops, so they start
            // at tier 0 with OSR), then warm up once over the whole working set.
            for (int round = 0; round < 3; round++)
            {
                foreach (Kernel k in RunOrder)
                    Pass(k, src, dst, Math.Min(pages, 4096));
                Thread.Sleep(200);
            }
            foreach (Kernel k in RunOrder)
                Pass(k, src, dst, pages);

            var samples = new Dictionary<Kernel, double[]>();
            foreach (Kernel k in RunOrder)
                samples[k] = new double[reps];
            for (int rep = 0; rep < reps; rep++)
            {
                foreach (Kernel k in RunOrder)
                    samples[k][rep] = Pass(k, src, dst, pages);
            }

            // Sanity: the last memcpy left dst equal to src.
            if (!new ReadOnlySpan<byte>(src, PageSize).SequenceEqual(new ReadOnlySpan<byte>(dst, PageSize)))
                throw new InvalidOperationException("pageops: dst does not equal src after memcpy");

            var median = new Dictionary<Kernel, double>();
            foreach (Kernel k in RunOrder)
                median[k] = Median(samples[k]);
            PrintTable(median);

            var result = new List<KeyValuePair<string, object>>();
            foreach ((Kernel k, string key) in Keys)
                result.Add(new(key, median[k]));
            result.Add(new("implementation", PageOps.Implementation));
            return result;
        }
        finally
        {
            NativeMemory.AlignedFree(src);
            NativeMemory.AlignedFree(dst);
        }
    }

    /// <summary>Runs <paramref name="kernel"/> over the first <paramref name="pages"/> pages; returns ns per page.</summary>
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static double Pass(Kernel kernel, byte* src, byte* dst, long pages)
    {
        long acc = 0;
        byte* end = src + pages * PageSize;
        long t0 = Stopwatch.GetTimestamp();
        switch (kernel)
        {
            case Kernel.Copy:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    PageOps.Copy(d, s);
                break;
            case Kernel.Compare:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    acc += PageOps.Compare(s, d);
                break;
            case Kernel.Equals:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    acc += PageOps.PageEquals(s, d) ? 1 : 0;
                break;
            case Kernel.Memcmp:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    acc += new ReadOnlySpan<byte>(s, PageSize).SequenceEqual(new ReadOnlySpan<byte>(d, PageSize)) ? 1 : 0;
                break;
            case Kernel.Checksum:
                for (byte* s = src; s < end; s += PageSize)
                    acc += PageOps.Checksum(s);
                break;
            case Kernel.Zero:
                for (byte* d = dst, dend = dst + pages * PageSize; d < dend; d += PageSize)
                    PageOps.Zero(d);
                break;
            case Kernel.IsZero:
                for (byte* d = dst, dend = dst + pages * PageSize; d < dend; d += PageSize)
                    acc += PageOps.IsZero(d) ? 1 : 0;
                break;
            case Kernel.Memcpy:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    Buffer.MemoryCopy(s, d, PageSize, PageSize);
                break;
            case Kernel.CopyNonTemporal:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    PageOps.CopyNonTemporal(d, s, PageSize);
                break;
            case Kernel.ZeroNonTemporal:
                for (byte* d = dst, dend = dst + pages * PageSize; d < dend; d += PageSize)
                    ZeroNonTemporal(d);
                break;
            case Kernel.LibcMemcpy:
                for (byte* s = src, d = dst; s < end; s += PageSize, d += PageSize)
                    LibcMemcpy(d, s, PageSize);
                break;
            case Kernel.LibcMemset:
                for (byte* d = dst, dend = dst + pages * PageSize; d < dend; d += PageSize)
                    LibcMemset(d, 0, PageSize);
                break;
        }
        long elapsed = Stopwatch.GetTimestamp() - t0;
        _sink += acc;

        // Every compare/equals/memcmp/iszero must have read whole, equal (or zero) pages.
        long expected = kernel switch
        {
            Kernel.Compare => 0,
            Kernel.Equals or Kernel.Memcmp or Kernel.IsZero => pages,
            _ => acc,
        };
        if (acc != expected)
            throw new InvalidOperationException($"pageops: {kernel} saw unexpected data ({acc} != {expected})");

        return elapsed * (1e9 / Stopwatch.Frequency) / pages;
    }

    /// <summary>A page zeroed with non-temporal stores (no read for ownership, the lines not kept), then a fence.</summary>
    private static void ZeroNonTemporal(byte* p)
    {
        if (!Avx.IsSupported)
        {
            PageOps.Zero(p);
            return;
        }
        Vector256<byte> zero = Vector256<byte>.Zero;
        for (int i = 0; i < PageSize; i += 64)
        {
            Avx.StoreAlignedNonTemporal(p + i, zero);
            Avx.StoreAlignedNonTemporal(p + i + 32, zero);
        }
        Sse.StoreFence();
    }

    // The C library's own kernels (glibc picks rep movsb / rep stosb or vector loops by size and CPU
    // features, as Linux's copy_page and clear_page use rep movs / rep stos); a P/Invoke costs ~5 ns.
    [DllImport("libc", EntryPoint = "memcpy")]
    private static extern void* LibcMemcpy(void* dst, void* src, nuint length);

    [DllImport("libc", EntryPoint = "memset")]
    private static extern void* LibcMemset(void* dst, int value, nuint length);

    private static double Median(double[] values)
    {
        double[] sorted = (double[])values.Clone();
        Array.Sort(sorted);
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    }

    private static void PrintTable(Dictionary<Kernel, double> median)
    {
        double memcpy = median[Kernel.Memcpy];
        double memcmp = median[Kernel.Memcmp];
        Console.WriteLine();
        Console.WriteLine($"{"kernel",-12} {"ns/page",9} {"GB/s",7}  {"vs memcpy",9}  {"vs memcmp",9}");
        foreach ((Kernel k, string key) in Keys)
        {
            double ns = median[k];
            string name = key[..^3];
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{name,-12} {ns,9:F1} {PageSize / ns,7:F2}  {ns / memcpy,8:F2}x  {ns / memcmp,8:F2}x"));
        }
        Console.WriteLine("(GB/s = page bytes / time; copy and memcpy also write a page, compare/equals/memcmp read two)");
        Console.WriteLine();
    }
}
