using System.Diagnostics;
using Vmm.Mm;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>Shared helpers of the address-space scenarios.</summary>
internal static class MmScenario
{
    public static Machine NewMachine(int nodeMib = 512) =>
        new(new MachineOptions { NodeCount = 2, NodeSizeBytes = (long)nodeMib << 20, BlockSizeBytes = 128L << 20, MinFreeKbytes = 0 });

    /// <summary>Touches every page of the arena once and frees it again, so host page faults are out of the measurement.</summary>
    public static void WarmArena(Machine machine, ulong bytes)
    {
        VmProcess warm = machine.CreateProcess();
        ulong va = warm.Mmap(bytes);
        for (ulong off = 0; off < bytes; off += Topology.PageSize)
            warm.Write<byte>(va + off, 1);
        warm.Exit();
    }

    /// <summary>
    /// Runs <paramref name="action"/> until tiered compilation has settled (a scenario touches new code
    /// all the time, which keeps postponing tier-up): a few rounds and a pause for the background JIT.
    /// </summary>
    public static void WarmUp(Action action, int rounds = 4)
    {
        for (int i = 0; i < rounds; i++)
        {
            action();
            Thread.Sleep(150);
        }
    }

    public static double Median(IEnumerable<double> values)
    {
        double[] sorted = [.. values.Order()];
        return sorted[sorted.Length / 2];
    }
}

/// <summary>scenario fault: demand-zero write faults, ns per 4 KiB page.</summary>
internal sealed class FaultScenario : IScenario
{
    public string Name => "fault";

    public string Description => "demand-zero write fault ns per page (--size-mib N, --reps N)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 128);
        ulong bytes = (ulong)sizeMib << 20;
        int reps = args.GetInt("reps", 5);
        // Nodes of 512 MiB, or larger for a larger buffer (the growth curve goes to 8 GiB).
        using Machine machine = MmScenario.NewMachine(nodeMib: Math.Max(512, (sizeMib + 128 + 127) / 128 * 128));
        double cold = Measure(machine, bytes);
        MmScenario.WarmUp(() => Measure(machine, bytes));
        var warm = new List<double>();
        for (int r = 0; r < reps; r++)
            warm.Add(Measure(machine, bytes));
        double median = MmScenario.Median(warm);
        Console.WriteLine($"demand-zero fault: {median:F0} ns/page warm (frames recycled and zeroed), {cold:F0} ns/page cold (first host touch)");
        return [new("fault_ns", median), new("fault_cold_ns", cold), new("size_mib", (int)(bytes >> 20))];
    }

    private static double Measure(Machine machine, ulong bytes)
    {
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(bytes);
        long start = Stopwatch.GetTimestamp();
        for (ulong off = 0; off < bytes; off += Topology.PageSize)
            p.Write<byte>(va + off, 1);
        double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / (bytes / Topology.PageSize);
        p.Exit();
        return ns;
    }
}

/// <summary>scenario cow: copy-on-write faults after fork, ns per page.</summary>
internal sealed class CowScenario : IScenario
{
    public string Name => "cow";

    public string Description => "copy-on-write fault ns per page after fork (--size-mib N, --reps N)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        ulong bytes = (ulong)args.GetInt("size-mib", 64) << 20;
        int reps = args.GetInt("reps", 5);
        using Machine machine = MmScenario.NewMachine();
        MmScenario.WarmArena(machine, bytes * 2);
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(bytes);
        parent.Fill(va, bytes, 0x5A);
        MmScenario.WarmUp(() =>
        {
            VmProcess warm = parent.Fork();
            for (ulong off = 0; off < bytes; off += Topology.PageSize)
                warm.Write<byte>(va + off, 1);
            warm.Exit();
        });
        var results = new List<double>();
        for (int r = 0; r <= reps; r++)
        {
            VmProcess child = parent.Fork();
            long start = Stopwatch.GetTimestamp();
            for (ulong off = 0; off < bytes; off += Topology.PageSize)
                child.Write<byte>(va + off, 1);
            double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / (bytes / Topology.PageSize);
            child.Exit();
            if (r > 0)
                results.Add(ns); // the first round warms up the JIT
        }
        double median = MmScenario.Median(results);
        Console.WriteLine($"copy-on-write fault: {median:F0} ns/page (copies 4 KiB)");
        return [new("cow_ns", median), new("size_mib", (int)(bytes >> 20))];
    }
}

/// <summary>scenario access: 8-byte accesses with the translation cached, 1 MiB copies, memcpy baseline.</summary>
internal sealed class AccessScenario : IScenario
{
    public string Name => "access";

    public string Description => "read8/write8 ns with cached translation; 1 MiB Read/Write GB/s vs memcpy";

    public unsafe IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int reps = args.GetInt("reps", 9);
        using Machine machine = MmScenario.NewMachine(256);
        VmProcess p = machine.CreateProcess();
        const int hotPages = 16; // fits the 64-entry software TLB
        ulong hot = p.Mmap(hotPages * Topology.PageSize);
        p.Fill(hot, hotPages * Topology.PageSize, 1);
        int ops = args.Has("copy-only") ? 1 : 20_000_000; // --copy-only: skip the 8-byte loops (for profiling)
        ulong mask = hotPages * Topology.PageSize - 8;

        double read8 = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
        {
            long sum = 0;
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < ops; i++)
                sum += p.Read<long>(hot + (((ulong)i * 72) & mask));
            double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / ops;
            GC.KeepAlive(sum);
            return ns;
        }));
        double write8 = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < ops; i++)
                p.Write<long>(hot + (((ulong)i * 72) & mask), i);
            return Stopwatch.GetElapsedTime(start).TotalNanoseconds / ops;
        }));

        const int mib = 1 << 20;
        const int buffers = 64; // 64 MiB of process memory, out of cache
        ulong big = p.Mmap((ulong)mib * buffers);
        p.Fill(big, (ulong)mib * buffers, 2);
        byte[] host = new byte[mib];
        double read1m = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < buffers; i++)
                p.Read(big + (ulong)i * mib, host);
            return (double)mib * buffers / Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        }));
        double write1m = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < buffers; i++)
                p.Write(big + (ulong)i * mib, host);
            return (double)mib * buffers / Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        }));
        byte* native = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)mib * buffers, Topology.PageSize);
        new Span<byte>(native, mib).Fill(3);
        for (int i = 0; i < buffers; i++)
            new Span<byte>(native + (long)i * mib, mib).Fill(3);
        double memcpy, memcpyWrite;
        fixed (byte* h = host)
        {
            byte* hp = h;
            memcpy = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
            {
                long start = Stopwatch.GetTimestamp();
                for (int i = 0; i < buffers; i++)
                    Buffer.MemoryCopy(native + (long)i * mib, hp, mib, mib);
                return (double)mib * buffers / Stopwatch.GetElapsedTime(start).TotalNanoseconds;
            }));
            // The write direction: from the 1 MiB host buffer into 64 MiB of memory out of cache.
            memcpyWrite = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
            {
                long start = Stopwatch.GetTimestamp();
                for (int i = 0; i < buffers; i++)
                    Buffer.MemoryCopy(hp, native + (long)i * mib, mib, mib);
                return (double)mib * buffers / Stopwatch.GetElapsedTime(start).TotalNanoseconds;
            }));
        }
        // The same bytes copied 4 KiB at a time from the frames the process's pages really occupy, in
        // virtual order: the cost of scattered frames without any translation.
        long[] frames = [.. Enumerable.Range(0, mib / Topology.PageSize * buffers).Select(i => p.GetPagemap(big + (ulong)i * Topology.PageSize).Pfn)];
        double scattered;
        fixed (byte* h = host)
        {
            byte* hp = h;
            scattered = MmScenario.Median(Enumerable.Range(0, reps).Select(_ =>
            {
                long start = Stopwatch.GetTimestamp();
                for (int i = 0; i < frames.Length; i++)
                    Buffer.MemoryCopy(machine.Arena.FrameAddress(frames[i]), hp + (i & 255) * Topology.PageSize, Topology.PageSize, Topology.PageSize);
                return (double)mib * buffers / Stopwatch.GetElapsedTime(start).TotalNanoseconds;
            }));
        }
        System.Runtime.InteropServices.NativeMemory.AlignedFree(native);
        Console.WriteLine($"read8 {read8:F2} ns, write8 {write8:F2} ns (translation cached)");
        Console.WriteLine($"1 MiB Read {read1m:F2} GB/s ({read1m / memcpy:P0} of memcpy {memcpy:F2}), Write {write1m:F2} GB/s ({write1m / memcpyWrite:P0} of memcpy into cold memory {memcpyWrite:F2})");
        Console.WriteLine($"memcpy of the same frames, 4 KiB at a time, no translation: {scattered:F2} GB/s");
        return
        [
            new("read8_ns", read8), new("write8_ns", write8),
            new("read1m_gbps", read1m), new("write1m_gbps", write1m), new("memcpy_gbps", memcpy),
            new("memcpy_write_gbps", memcpyWrite),
            new("memcpy_frames_gbps", scattered),
        ];
    }
}

/// <summary>scenario fork: fork of a process with 256 MiB touched.</summary>
internal sealed class ForkScenario : IScenario
{
    public string Name => "fork";

    public string Description => "fork ms of a process with --size-mib N (256) touched";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        ulong bytes = (ulong)args.GetInt("size-mib", 256) << 20;
        int reps = args.GetInt("reps", 5);
        using Machine machine = MmScenario.NewMachine();
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(bytes);
        parent.Fill(va, bytes, 7);
        MmScenario.WarmUp(() => parent.Fork().Exit());
        var results = new List<double>();
        for (int r = 0; r <= reps; r++)
        {
            long start = Stopwatch.GetTimestamp();
            VmProcess child = parent.Fork();
            double ms = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            child.Exit();
            if (r > 0)
                results.Add(ms);
        }
        double median = MmScenario.Median(results);
        Console.WriteLine($"fork of {bytes >> 20} MiB touched: {median:F1} ms ({median * 1e6 / (bytes / Topology.PageSize):F0} ns per page)");
        return [new("fork_ms", median), new("size_mib", (int)(bytes >> 20))];
    }
}

/// <summary>
/// scenario flush: the cost of one TLB shootdown (<c>TlbShootdown.Flush</c>), the price every PTE
/// change that must be flushed pays, alone and while another thread keeps reading Vmm memory.
/// Mechanisms that change many PTEs (KSM, migration, zap) batch against this number.
/// </summary>
internal sealed class FlushScenario : IScenario
{
    public string Name => "flush";

    public string Description => "ns per TLB shootdown, idle and with one thread reading (--count N)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int count = args.GetInt("count", 20_000);
        using Machine machine = MmScenario.NewMachine(128);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(16 * Topology.PageSize);
        p.Fill(va, 16 * Topology.PageSize, 1);

        MmScenario.WarmUp(() => Measure(count / 10), rounds: 2);
        double idle = Measure(count);

        using var stop = new CancellationTokenSource();
        long reads = 0;
        var reader = new Thread(() =>
        {
            long n = 0;
            while (!stop.IsCancellationRequested)
            {
                for (int i = 0; i < 1024; i++)
                    n += p.Read<long>(va + (ulong)(i & 15) * Topology.PageSize);
                Interlocked.Add(ref reads, 1024);
            }
            GC.KeepAlive(n);
        }) { IsBackground = true };
        reader.Start();
        while (Volatile.Read(ref reads) == 0)
            Thread.Yield();
        double busy = Measure(count);
        stop.Cancel();
        reader.Join();

        Console.WriteLine($"TLB shootdown: {idle:F0} ns alone, {busy:F0} ns with one thread reading Vmm memory");
        return [new("flush_ns", idle), new("flush_busy_ns", busy)];
    }

    private static double Measure(int count)
    {
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < count; i++)
            TlbShootdown.Flush();
        return Stopwatch.GetElapsedTime(start).TotalNanoseconds / count;
    }
}
