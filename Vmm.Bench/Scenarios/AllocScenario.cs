using System.Diagnostics;
using Vmm.Memory;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// Allocate + free round trips on one thread, timed with a stopwatch over many iterations (median of
/// repetitions): order 0 through the per-CPU lists, order 9 through the buddy lists.
/// </summary>
internal sealed class AllocScenario : IScenario
{
    public string Name => "alloc";

    public string Description => "order-0 and order-9 allocate+free ns (--reps N, --iterations N)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int reps = args.GetInt("reps", 7);
        int iterations = args.GetInt("iterations", 5_000_000);
        using var machine = new Machine(new MachineOptions { NodeCount = 2, NodeSizeBytes = 256L << 20, BlockSizeBytes = 128L << 20, MinFreeKbytes = 0 });
        PageAllocator allocator = machine.Allocator;

        double order0 = Median(reps, () =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < iterations; i++)
                allocator.FreePages(allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 0));
            return Stopwatch.GetElapsedTime(start).TotalNanoseconds / iterations;
        });
        double order0Zeroed = Median(reps, () =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < iterations / 4; i++)
                allocator.FreePages(allocator.AllocPages(0, AllocFlags.Movable, 0));
            return Stopwatch.GetElapsedTime(start).TotalNanoseconds / (iterations / 4);
        });
        int bigIterations = Math.Max(1, iterations / 100);
        double order9 = Median(reps, () =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < bigIterations; i++)
                allocator.FreePages(allocator.AllocPages(9, AllocFlags.Movable | AllocFlags.NoZero, 0), 9);
            return Stopwatch.GetElapsedTime(start).TotalNanoseconds / bigIterations;
        });
        Console.WriteLine($"order-0 alloc+free        {order0,8:F1} ns");
        Console.WriteLine($"order-0 alloc+free zeroed {order0Zeroed,8:F1} ns");
        Console.WriteLine($"order-9 alloc+free        {order9,8:F1} ns");
        return
        [
            new("order0_ns", order0),
            new("order0_zeroed_ns", order0Zeroed),
            new("order9_ns", order9),
        ];
    }

    private static double Median(int reps, Func<double> measure)
    {
        measure(); // warm up (and tier up) once
        double[] results = [.. Enumerable.Range(0, reps).Select(_ => measure())];
        Array.Sort(results);
        return results[results.Length / 2];
    }
}
