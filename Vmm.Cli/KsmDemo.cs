// KsmDemo: the headline of `vmm`: kernel samepage merging on a machine of real memory.
//
// The story, in four acts:
//   1. Several processes each write a buffer rich in duplicates (DemoBuffer: a shared library image,
//      zero pages, pages repeated within a process, unique data) and opt in to merging: madvise
//      (MADV_MERGEABLE) for all but the last, which uses the process-wide prctl (PR_SET_MEMORY_MERGE).
//   2. ksmd starts (run = 1) and merges while a live view shows the counters of /sys/kernel/mm/ksm,
//      each process's ksm_stat and the host's RSS, until they stop changing.
//   3. Processes write into merged pages: every write to a KSM page copies it (cow_ksm). Two processes
//      apply the same patch, so their patched pages become twins and merge again; a third scribbles
//      random data, which never merges. ksmd rescans and the view shows the counters drop and recover.
//   4. ksmd stops (run = 0) and the machine audits itself: every mapcount, refcount, rmap link and
//      KSM counter recounted from the page tables. A difference fails the run (exit code 1).
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>The demo's knobs (the `vmm` command's options).</summary>
/// <param name="Processes">processes, each with one buffer (2 or more).</param>
/// <param name="BufferMib">MiB per buffer.</param>
/// <param name="UseZeroPages">the use_zero_pages knob: zero pages become the zero page instead of KSM pages.</param>
/// <param name="PagesToScan">pages_to_scan; 0 picks a fortieth of all the buffers (a full scan in about 40 batches, a second).</param>
/// <param name="SleepMillisecs">sleep_millisecs between batches.</param>
/// <param name="TimeoutSeconds">how long each act may wait for merging to converge.</param>
internal sealed record KsmDemoOptions(int Processes, int BufferMib, bool UseZeroPages, int PagesToScan, int SleepMillisecs, int TimeoutSeconds)
{
    /// <summary>Checks the options against the machine; throws UsageException with a message for the user (exit code 2).</summary>
    public void Validate(MachineOptions machine)
    {
        if (Processes < 2 || Processes > 64)
            throw new UsageException($"--processes must be 2 to 64 (got {Processes})");
        if (BufferMib < 1)
            throw new UsageException($"--buffer-mib must be at least 1 (got {BufferMib})");
        long total = (long)machine.NodeCount * machine.NodeSizeBytes;
        long wanted = (long)Processes * BufferMib * Units.MiB;
        if (wanted > total * 3 / 4)
            throw new UsageException($"{Processes} buffers of {BufferMib} MiB do not fit in a {total / Units.MiB} MiB machine with room to spare (at most 3/4 of it); lower --buffer-mib or raise --node-size-mib");
        if (PagesToScan < 0 || SleepMillisecs < 0 || TimeoutSeconds < 1)
            throw new UsageException("--pages-to-scan and --sleep-millisecs must not be negative, --timeout-seconds at least 1");
    }
}

/// <summary>Runs the KSM demo on a fresh machine.</summary>
internal sealed class KsmDemo
{
    private readonly Machine _machine;
    private readonly Ksm _ksm;
    private readonly KsmDemoOptions _options;
    private readonly IAnsiConsole _console;
    private readonly DemoBuffer _layout;
    private readonly List<VmProcess> _processes = [];
    private readonly List<ulong> _buffers = [];

    private KsmDemo(Machine machine, KsmDemoOptions options, IAnsiConsole console)
    {
        _machine = machine;
        _ksm = machine.Ksm ?? throw new InvalidOperationException("the machine was built without KSM");
        _options = options;
        _console = console;
        _layout = new DemoBuffer((int)((long)options.BufferMib * Units.MiB / DemoBuffer.PageSize), options.Processes);
    }

    /// <summary>Builds the machine, runs the four acts, and returns the exit code (1 if the audit found problems).</summary>
    public static int Run(MachineOptions machineOptions, KsmDemoOptions options, IAnsiConsole console)
    {
        options.Validate(machineOptions);
        using Machine machine = Usage.CreateMachine(machineOptions);
        return new KsmDemo(machine, options, console).Run();
    }

    private int Run()
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        long rssBoot = _machine.GetStats().HostRssBytes;
        Introduce();
        CreateProcesses();
        long rssWritten = _machine.GetStats().HostRssBytes;
        _console.MarkupLineInterpolated($"Host RSS: {Units.Rss(rssBoot)} at boot, {Units.Rss(rssWritten)} with the buffers written.");

        StartKsmd();
        long saveable = _layout.SaveablePages(_options.UseZeroPages, _ksm.GetKnobs().MaxPageSharing);
        KsmSnapshot merged = new KsmView(_console, _machine, _processes, saveable)
            .Watch("Act 2: ksmd merges the buffers", Timeout, out bool converged);
        _ksm.WaitForMemoryRelease(); // the freed frames go back to the host in the background
        merged = merged with { HostRssBytes = _machine.GetStats().HostRssBytes };
        ReportMerged(merged, converged, saveable, rssWritten);

        long lostSaving = BreakSharing(out long expectedCow);
        KsmSnapshot rescanned = new KsmView(_console, _machine, _processes, saveable - lostSaving)
            .Watch("Act 3: ksmd rescans after the writes", Timeout, out converged);
        ReportRescanned(merged, rescanned, converged, expectedCow);

        StopKsmd();
        int exitCode = Audit();
        _console.MarkupLineInterpolated($"[grey]KSM demo: {clock.Elapsed.TotalSeconds:F1} s[/]");
        return exitCode;
    }

    private TimeSpan Timeout => TimeSpan.FromSeconds(_options.TimeoutSeconds);

    // ---- act 1 -------------------------------------------------------------------------------------

    private void Introduce()
    {
        Topology topology = _machine.Topology;
        _console.Write(new Rule("[bold]Vmm: kernel samepage merging (KSM)[/]").LeftJustified());
        _console.MarkupLineInterpolated(
            $"A machine of {topology.NodeCount} NUMA nodes x {topology.FramesPerNode * Topology.PageSize / Units.MiB} MiB of real memory; {_options.Processes} processes, each with a {_options.BufferMib} MiB buffer ({_layout.Pages:N0} pages) laid out as:");
        var table = new Table().AddColumns("region", "pages", "content", "what KSM can do");
        table.Columns[1].RightAligned();
        table.AddRow("library", _layout.Library.ToString("N0"), "the same image in every process", $"keep one copy: save {_options.Processes - 1} of {_options.Processes}");
        table.AddRow("zero", _layout.Zero.ToString("N0"), "zero-filled pages",
            _options.UseZeroPages ? "map the zero page (use_zero_pages)" : "merge (a KSM page serves at most 256 mappings)");
        table.AddRow("repeated", _layout.Repeated.ToString("N0"), $"{_layout.RepeatPool:N0} pages, each {DemoBuffer.RepeatCopies} times", $"keep one of each {DemoBuffer.RepeatCopies} within the process");
        table.AddRow("unique", _layout.Unique.ToString("N0"), "random data", "nothing");
        _console.Write(table);
    }

    private void CreateProcesses()
    {
        ulong bytes = (ulong)_layout.Pages * DemoBuffer.PageSize;
        byte[] page = new byte[DemoBuffer.PageSize];
        for (int i = 0; i < _options.Processes; i++)
        {
            VmProcess process = _machine.CreateProcess(homeNode: i % _machine.Topology.NodeCount);
            ulong va = process.Mmap(bytes);
            for (int p = 0; p < _layout.Pages; p++)
            {
                _layout.FillPage(i, p, page);
                process.Write(va + (ulong)p * DemoBuffer.PageSize, page);
            }
            OptIn(process, va, bytes, processWide: i == _options.Processes - 1);
            _processes.Add(process);
            _buffers.Add(va);
        }
        _console.MarkupLineInterpolated(
            $"P1..P{_options.Processes - 1} advised their buffers MADV_MERGEABLE; P{_options.Processes} turned on PR_SET_MEMORY_MERGE (all its memory). Home nodes alternate; merge_across_nodes = 1.");
    }

    private static void OptIn(VmProcess process, ulong va, ulong bytes, bool processWide)
    {
        Errno error = processWide ? process.SetMemoryMerge(true) : process.Madvise(va, bytes, Advice.Mergeable);
        if (error != Errno.None)
            throw new InvalidOperationException($"{process}: opting in to KSM failed: {error}");
    }

    // ---- act 2 -------------------------------------------------------------------------------------

    private void StartKsmd()
    {
        long totalPages = (long)_layout.Pages * _options.Processes;
        long pagesToScan = _options.PagesToScan > 0 ? _options.PagesToScan : Math.Max(256, totalPages / 40);
        SetKnob("pages_to_scan", pagesToScan.ToString());
        SetKnob("sleep_millisecs", _options.SleepMillisecs.ToString());
        SetKnob("use_zero_pages", _options.UseZeroPages ? "1" : "0");
        SetKnob("run", "1");
        _console.MarkupLineInterpolated(
            $"ksmd: run=1 pages_to_scan={pagesToScan:N0} sleep_millisecs={_options.SleepMillisecs} use_zero_pages={(_options.UseZeroPages ? 1 : 0)} ({totalPages:N0} pages to scan in all)");
    }

    private void SetKnob(string knob, string value)
    {
        Errno error = _ksm.Write(knob, value);
        if (error != Errno.None)
            throw new InvalidOperationException($"writing {value} to {knob} failed: {error}");
    }

    private void ReportMerged(KsmSnapshot merged, bool converged, long saveable, long rssBefore)
    {
        KsmStats k = merged.Ksm;
        long saved = k.PagesSharing + k.KsmZeroPages;
        ReportConvergence(merged, converged);
        _console.MarkupLineInterpolated(
            $"Saved [green]{saved:N0}[/] of {saveable:N0} saveable pages ({(double)saved / Math.Max(1, saveable):P0}): {Units.Mib(saved * DemoBuffer.PageSize)}, general_profit {Units.Mib(k.GeneralProfit)} after KSM's metadata; host RSS {Units.Rss(rssBefore)} -> {Units.Rss(merged.HostRssBytes)}.");
    }

    private void ReportConvergence(KsmSnapshot snapshot, bool converged)
    {
        if (converged)
            _console.MarkupLineInterpolated($"Converged after {snapshot.Elapsed.TotalSeconds:F1} s: the counters did not change over two full scans.");
        else
            _console.MarkupLineInterpolated($"[yellow]Not converged within {_options.TimeoutSeconds} s[/] (raise --timeout-seconds or --pages-to-scan); moving on.");
    }

    // ---- act 3 -------------------------------------------------------------------------------------

    /// <summary>
    /// P1 and P2 apply the same patch to the first quarter of the library; one process scribbles over
    /// half of its repeated pages. Returns the saving that is lost for good (the scribbled pages, and
    /// the patched ones where the old image keeps another user), and the copies expected.
    /// </summary>
    private long BreakSharing(out long expectedCow)
    {
        PauseAtEndOfFullScan();
        long cowBefore = _ksm.GetStats().CowKsm;
        int patched = Math.Max(1, _layout.Library / 4);
        for (int i = 0; i < 2; i++)
            for (int p = 0; p < patched; p++)
                _processes[i].Write<ulong>(_buffers[i] + (ulong)p * DemoBuffer.PageSize + 64, 0x0A7C4ED0_2026UL);

        int scribbler = Math.Min(2, _processes.Count - 1);
        int scribbled = _layout.Repeated / 2;
        byte[] page = new byte[DemoBuffer.PageSize];
        for (int p = 0; p < scribbled; p++)
        {
            DemoBuffer.FillRandom(page, (4UL << 56) | (uint)p);
            int index = _layout.RepeatedStart + _layout.Repeated - scribbled + p;
            _processes[scribbler].Write(_buffers[scribbler] + (ulong)index * DemoBuffer.PageSize, page);
        }

        expectedCow = 2L * patched + scribbled;
        long cow = _ksm.GetStats().CowKsm - cowBefore;
        SetKnob("run", "1");
        _console.Write(new Rule("Act 3: writes break sharing").LeftJustified());
        _console.MarkupLineInterpolated(
            $"P1 and P2 patched the first {patched:N0} pages of their library (the same 8 bytes each); P{scribbler + 1} overwrote {scribbled:N0} of its repeated pages with random data.");
        _console.MarkupLineInterpolated(
            $"cow_ksm: [yellow]{cow:N0}[/] writes hit a KSM page and got a private copy. The counters fall when ksmd next visits each page; the patched pages of P1 and P2 are twins again, and merge once seen unchanged twice.");
        _console.MarkupLine(
            "[grey](ksmd was paused at the end of a full scan for the writes: with smart_scan, twins first revisited in different passes could stay out of step for good.)[/]");
        return scribbled + (_processes.Count >= 3 ? patched : 0);
    }

    /// <summary>
    /// Stops ksmd and finishes the full scan it was in, so that the writes land between two passes.
    /// Why: smart_scan (on by default, as in Linux) visits a page that stopped merging less and less
    /// often, on a schedule counted from its first visit after the write. If P1's patched page were
    /// first revisited in one pass and P2's twin in the next, their unskipped visits would fall in
    /// alternate passes forever, each finding the other's entry already flushed from the unstable
    /// index: they would never merge again (Linux's smart_scan behaves the same way).
    /// </summary>
    private void PauseAtEndOfFullScan()
    {
        SetKnob("run", "0");
        long scans = _ksm.GetStats().FullScans;
        while (_ksm.GetStats().FullScans == scans && _ksm.ScanPages(int.MaxValue) > 0)
        {
        }
    }

    private void ReportRescanned(KsmSnapshot merged, KsmSnapshot rescanned, bool converged, long expectedCow)
    {
        ReportConvergence(rescanned, converged);
        var table = new Table().AddColumns("", "merged (act 2)", "after writes and rescans", "change");
        for (int i = 1; i < 4; i++)
            table.Columns[i].RightAligned();
        KsmStats a = merged.Ksm, b = rescanned.Ksm;
        AddChange(table, "pages_shared", a.PagesShared, b.PagesShared);
        AddChange(table, "pages_sharing", a.PagesSharing, b.PagesSharing);
        AddChange(table, "pages_unshared", a.PagesUnshared, b.PagesUnshared);
        AddChange(table, "pages_volatile", a.PagesVolatile, b.PagesVolatile);
        AddChange(table, "ksm_zero_pages", a.KsmZeroPages, b.KsmZeroPages);
        AddChange(table, "cow_ksm", a.CowKsm, b.CowKsm);
        table.AddRow("general_profit", Units.Mib(a.GeneralProfit), Units.Mib(b.GeneralProfit), Units.SignedMib(b.GeneralProfit - a.GeneralProfit));
        table.AddRow("host RSS", Units.Rss(merged.HostRssBytes), Units.Rss(rescanned.HostRssBytes),
            merged.HostRssBytes < 0 || rescanned.HostRssBytes < 0 ? "n/a" : Units.SignedMib(rescanned.HostRssBytes - merged.HostRssBytes));
        _console.Write(table);
        string verdict = b.CowKsm - a.CowKsm == expectedCow ? "[green]as expected[/]" : $"[yellow]expected {expectedCow:N0}[/]";
        _console.MarkupLine($"cow_ksm rose by {b.CowKsm - a.CowKsm:N0}: {verdict}.");
    }

    private static void AddChange(Table table, string name, long before, long after) =>
        table.AddRow(name, before.ToString("N0"), after.ToString("N0"), $"{after - before:+#,0;-#,0;0}");

    // ---- act 4 -------------------------------------------------------------------------------------

    private void StopKsmd()
    {
        // run = 0 takes the thread mutex, so it returns only after ksmd's current batch: from here
        // nothing changes memory behind the audit's back.
        SetKnob("run", "0");
    }

    private int Audit()
    {
        IReadOnlyList<string> problems = _machine.Audit();
        if (problems.Count == 0)
        {
            _console.MarkupLine("ksmd stopped (run=0). Audit: [green]clean[/] (every mapcount, refcount, rmap link and KSM counter recounted from the page tables)");
            return ExitCodes.Success;
        }
        _console.MarkupLineInterpolated($"[red]Audit: {problems.Count} problems[/]");
        foreach (string problem in problems.Take(20))
            _console.MarkupLineInterpolated($"  [red]-[/] {problem}");
        return ExitCodes.AuditProblem;
    }
}
