// KsmView: what the KSM demo shows while ksmd runs. A snapshot gathers the machine's counters (as
// /sys/kernel/mm/ksm shows them), each process's ksm_stat and the host's RSS. On a terminal the
// snapshot is a live table redrawn ten times a second; when the output is a pipe or a CI log (Spectre's
// live display cannot redraw there) it becomes one line per full scan, and the table is printed once
// at the end. Watching stops when merging has converged: the counters equal at three full-scan
// boundaries in a row (two whole scans changed nothing), or at a timeout.
using System.Diagnostics;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace Vmm.Cli;

/// <summary>The counters at one moment.</summary>
/// <param name="Elapsed">time since the phase began.</param>
/// <param name="Ksm">the machine's KSM counters.</param>
/// <param name="HostRssBytes">the host process's resident set, -1 where unknown.</param>
/// <param name="Processes">each watched process's ksm_stat, in order.</param>
internal sealed record KsmSnapshot(TimeSpan Elapsed, KsmStats Ksm, long HostRssBytes, IReadOnlyList<ProcessKsmStats> Processes)
{
    public static KsmSnapshot Take(Machine machine, IReadOnlyList<VmProcess> processes, TimeSpan elapsed) =>
        new(elapsed, machine.Ksm!.GetStats(), machine.GetStats().HostRssBytes, [.. processes.Select(p => p.GetKsmStats())]);
}

/// <summary>Decides when merging has converged: the merge counters unchanged over two full scans.</summary>
internal sealed class ConvergenceDetector
{
    private const int BoundariesInARow = 3;

    private readonly List<(long Shared, long Sharing, long Zero)> _atBoundaries = [];
    private long _lastFullScans = -1;

    /// <summary>Feeds one snapshot; true once converged.</summary>
    public bool Observe(KsmSnapshot snapshot)
    {
        KsmStats s = snapshot.Ksm;
        if (_lastFullScans < 0)
        {
            _lastFullScans = s.FullScans; // the scan in progress when watching began does not count
            return false;
        }
        if (s.FullScans == _lastFullScans)
            return false;
        _lastFullScans = s.FullScans;
        _atBoundaries.Add((s.PagesShared, s.PagesSharing, s.KsmZeroPages));
        int n = _atBoundaries.Count;
        return n >= BoundariesInARow && _atBoundaries.Skip(n - BoundariesInARow).Distinct().Count() == 1;
    }
}

/// <summary>Renders snapshots, and watches ksmd until it converges.</summary>
internal sealed class KsmView
{
    private static readonly TimeSpan RefreshInterval = TimeSpan.FromMilliseconds(100);

    private readonly IAnsiConsole _console;
    private readonly Machine _machine;
    private readonly IReadOnlyList<VmProcess> _processes;
    private readonly long _saveablePages;

    /// <param name="console">where to draw.</param>
    /// <param name="machine">the machine whose ksmd runs.</param>
    /// <param name="processes">the processes to show a row for.</param>
    /// <param name="saveablePages">what full merging would save, for the "saved so far" row.</param>
    public KsmView(IAnsiConsole console, Machine machine, IReadOnlyList<VmProcess> processes, long saveablePages)
    {
        _console = console;
        _machine = machine;
        _processes = processes;
        _saveablePages = saveablePages;
    }

    /// <summary>
    /// Whether the console can redraw in place. Spectre reports a pipe as interactive when the session
    /// is, so a redirected stdout is checked as well.
    /// </summary>
    public static bool IsLive(IAnsiConsole console) =>
        console.Profile.Capabilities.Interactive && console.Profile.Capabilities.Ansi && !Console.IsOutputRedirected;

    /// <summary>Shows the counters until they converge or <paramref name="timeout"/> passes; returns the last snapshot.</summary>
    public KsmSnapshot Watch(string title, TimeSpan timeout, out bool converged)
    {
        var detector = new ConvergenceDetector();
        var clock = Stopwatch.StartNew();
        KsmSnapshot snapshot = KsmSnapshot.Take(_machine, _processes, clock.Elapsed);
        detector.Observe(snapshot);
        bool stable = false;

        // One step: wait, take a snapshot, and say whether to stop.
        bool Step()
        {
            Thread.Sleep(RefreshInterval);
            snapshot = KsmSnapshot.Take(_machine, _processes, clock.Elapsed);
            stable = detector.Observe(snapshot);
            return stable || clock.Elapsed >= timeout;
        }

        if (IsLive(_console))
        {
            _console.Live(Render(title, snapshot)).AutoClear(false).Start(context =>
            {
                bool done = false;
                while (!done)
                {
                    done = Step();
                    context.UpdateTarget(Render(title, snapshot));
                }
            });
        }
        else
        {
            // Not a terminal: a line per full scan, then the table once.
            _console.Write(new Rule(title).LeftJustified());
            WriteLine(Line(snapshot));
            long printedScans = snapshot.Ksm.FullScans;
            bool done = false;
            while (!done)
            {
                done = Step();
                if (snapshot.Ksm.FullScans != printedScans || done)
                {
                    printedScans = snapshot.Ksm.FullScans;
                    WriteLine(Line(snapshot));
                }
            }
            _console.Write(Render(title, snapshot));
        }
        converged = stable;
        return snapshot;
    }

    /// <summary>A plain line straight to the output: Spectre would wrap it at the console width.</summary>
    private void WriteLine(string line)
    {
        TextWriter writer = _console.Profile.Out.Writer;
        writer.WriteLine(line);
        writer.Flush();
    }

    /// <summary>One plain line (for logs): time, scans and the headline counters.</summary>
    public static string Line(KsmSnapshot s)
    {
        KsmStats k = s.Ksm;
        return $"  {s.Elapsed.TotalSeconds,5:F1}s  full_scans {k.FullScans,3}  shared {k.PagesShared,7:N0}  sharing {k.PagesSharing,7:N0}  " +
               $"unshared {k.PagesUnshared,7:N0}  volatile {k.PagesVolatile,7:N0}  zero {k.KsmZeroPages,6:N0}  " +
               $"profit {Units.Mib(k.GeneralProfit)}  RSS {Units.Rss(s.HostRssBytes)}";
    }

    /// <summary>The full view: a title, the machine's counters and a row per process.</summary>
    public IRenderable Render(string title, KsmSnapshot s) =>
        new Rows(
            new Markup($"[bold]{Markup.Escape(title)}[/]  [grey]{s.Elapsed.TotalSeconds:F1} s[/]"),
            CountersTable(s),
            ProcessTable(s));

    private Table CountersTable(KsmSnapshot s)
    {
        KsmStats k = s.Ksm;
        var table = new Table().AddColumns("counter", "value", "meaning");
        table.Columns[1].RightAligned();
        table.AddRow("full_scans", k.FullScans.ToString("N0"), "passes over all mergeable memory");
        table.AddRow("pages_shared", k.PagesShared.ToString("N0"), "KSM pages in use (one copy of a content)");
        table.AddRow("pages_sharing", $"[green]{k.PagesSharing:N0}[/]", "further mappings of them: pages saved");
        table.AddRow("pages_unshared", k.PagesUnshared.ToString("N0"), "unchanged for a scan, no twin found yet");
        table.AddRow("pages_volatile", k.PagesVolatile.ToString("N0"), "changed, not seen twice yet, or skipped");
        table.AddRow("ksm_zero_pages", k.KsmZeroPages.ToString("N0"), "mappings replaced by the zero page");
        table.AddRow("general_profit", $"[green]{Units.Mib(k.GeneralProfit)}[/]", "saved minus KSM's rmap items");
        table.AddRow("host RSS", Units.Rss(s.HostRssBytes), "resident memory of this host process");
        double fraction = _saveablePages == 0 ? 1 : (double)(k.PagesSharing + k.KsmZeroPages) / _saveablePages;
        table.AddRow("saved so far", $"{fraction:P0}", $"of {_saveablePages:N0} saveable pages ({Units.Mib(_saveablePages * DemoBuffer.PageSize)})");
        return table;
    }

    private Table ProcessTable(KsmSnapshot s)
    {
        var table = new Table().AddColumns("process", "RSS anon", "rmap_items", "merging_pages", "zero_pages", "profit");
        for (int i = 1; i < table.Columns.Count; i++)
            table.Columns[i].RightAligned();
        for (int i = 0; i < _processes.Count; i++)
        {
            ProcessKsmStats p = s.Processes[i];
            table.AddRow($"P{i + 1} pid {_processes[i].Pid}", Units.Mib(_processes[i].RssAnonPages * DemoBuffer.PageSize),
                p.RmapItems.ToString("N0"), p.MergingPages.ToString("N0"), p.ZeroPages.ToString("N0"), Units.Mib(p.ProcessProfit));
        }
        return table;
    }
}
