// BalloonDemo: `vmm balloon`, the memory balloon (Linux's virtio-balloon) through the public API only.
//
// The story:
//   1. A process on node 0 writes --process-mib MiB and exits: its frames are free again but still
//      resident in the host (RSS stays up).
//   2. The balloon inflates by --inflate-mib MiB: the frames leave the allocator and their memory goes
//      back to the host (RSS falls). Tables: each zone's managed and free memory, the balloon's counters.
//   3. The ZONE_MOVABLE block holding the most balloon pages goes offline: its balloon pages are movable
//      (movable_operations), so the offline migrates them (balloon_migrate) instead of failing.
//   4. The balloon deflates, the block comes online again, and the machine audits itself. A failed step,
//      counters that disagree or an Audit problem make the exit code 1.
using System.Diagnostics;
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>The options of `vmm balloon`.</summary>
/// <param name="ProcessMib">MiB the process writes before it exits (memory that stays resident until the balloon takes it).</param>
/// <param name="InflateMib">MiB the balloon inflates by.</param>
internal sealed record BalloonDemoOptions(int ProcessMib, int InflateMib)
{
    /// <summary>Checks the options against the machine; throws UsageException (exit code 2).</summary>
    public void Validate(MachineOptions machine)
    {
        if (machine.NodeSizeBytes / machine.BlockSizeBytes < 2)
            throw new UsageException(
                $"--node-size-mib ({machine.NodeSizeBytes / Units.MiB}) must hold at least two blocks of --block-size-mib ({machine.BlockSizeBytes / Units.MiB}): one in ZONE_NORMAL, one in ZONE_MOVABLE to take offline");
        if ((long)ProcessMib * Units.MiB > machine.NodeSizeBytes)
            throw new UsageException($"--process-mib ({ProcessMib}) must fit in a node ({machine.NodeSizeBytes / Units.MiB} MiB)");
        if ((long)InflateMib * Units.MiB > machine.NodeSizeBytes)
            throw new UsageException($"--inflate-mib ({InflateMib}) must fit in a node ({machine.NodeSizeBytes / Units.MiB} MiB): the rest of the machine must have room for what an offline moves");
    }
}

/// <summary>Runs the balloon demo on a fresh two-node machine.</summary>
internal sealed class BalloonDemo
{
    private const int PageSize = Topology.PageSize;

    private readonly Machine _machine;
    private readonly IAnsiConsole _console;
    private readonly BalloonDemoOptions _options;
    private readonly List<string> _problems = [];

    private BalloonDemo(Machine machine, BalloonDemoOptions options, IAnsiConsole console)
    {
        _machine = machine;
        _options = options;
        _console = console;
    }

    /// <summary>Builds the machine, runs the demo and returns the exit code (1: a failed step or an Audit problem).</summary>
    public static int Run(MachineOptions machineOptions, BalloonDemoOptions options, IAnsiConsole console)
    {
        options.Validate(machineOptions);
        using Machine machine = Usage.CreateMachine(machineOptions with { BackgroundThreads = false });
        return new BalloonDemo(machine, options, console).Run();
    }

    private int Run()
    {
        var clock = Stopwatch.StartNew();
        Balloon balloon = _machine.Balloon;
        Topology topology = _machine.Topology;
        _console.Write(new Rule("[bold]Vmm: the memory balloon[/]").LeftJustified());

        // 1. Memory used and freed: still resident.
        VmProcess process = _machine.CreateProcess(homeNode: 0);
        ulong bytes = (ulong)_options.ProcessMib * Units.MiB;
        ulong va = process.Mmap(bytes);
        process.Fill(va, bytes, 0x5A);
        process.Exit();
        long rssFreed = _machine.GetStats().HostRssBytes;
        _console.MarkupLineInterpolated(
            $"A machine of {topology.NodeCount} nodes x {Units.Mib(topology.FramesPerNode * PageSize)} in blocks of {Units.Mib(topology.BlockSizeBytes)}. A process wrote {Units.Mib((long)bytes)} and exited: its frames are free, but still resident (host RSS {Units.Rss(rssFreed)}).");

        // 2. Inflate.
        long want = (long)_options.InflateMib * Units.MiB / PageSize;
        long taken = balloon.Inflate(want);
        long rssInflated = _machine.GetStats().HostRssBytes;
        _console.Write(new Rule($"The balloon inflates by {Units.Mib(want * PageSize)}").LeftJustified());
        _console.MarkupLineInterpolated(
            $"Inflate({want:N0} pages) took {taken:N0} pages ({Units.Mib(taken * PageSize)}): they left the allocator and their memory went back to the host. Host RSS {Units.Rss(rssFreed)} -> {Units.Rss(rssInflated)}{(rssFreed >= 0 && rssInflated >= 0 ? $" ({Units.SignedMib(rssInflated - rssFreed)})" : "")}.");
        if (taken != want)
            _problems.Add($"the balloon took {taken} of {want} pages");
        ShowZones();
        ShowCounters();

        // 3. Offline of the ZONE_MOVABLE block holding the most balloon pages.
        MemoryBlock? block = ChooseBlock();
        if (block is null)
        {
            _problems.Add("no online ZONE_MOVABLE block holds balloon pages");
        }
        else
        {
            long inBlock = BalloonPagesIn(block);
            long migratedBefore = balloon.Migrated;
            _console.Write(new Rule($"memory{block.Index} (node {block.Node}, {block.Zone}, {inBlock:N0} balloon pages) goes offline").LeftJustified());
            OfflineResult result = block.Offline();
            if (result.Succeeded)
            {
                _console.MarkupLineInterpolated(
                    $"memory{block.Index} is [green]{block.State}[/]: {result.PagesMoved:N0} pages moved in {result.Passes} pass{(result.Passes == 1 ? "" : "es")}, {result.Elapsed.TotalMilliseconds:F1} ms. The balloon's pages are movable (movable_operations): the balloon gave each new frame's memory back, and the old ones were freed.");
                if (balloon.Migrated - migratedBefore != inBlock)
                    _problems.Add($"balloon_migrate rose by {balloon.Migrated - migratedBefore}, the block held {inBlock} balloon pages");
            }
            else
            {
                _problems.Add($"the offline of memory{block.Index} failed with {result.Error}");
                _console.MarkupLineInterpolated($"[red]offline of memory{block.Index} failed: {result.Error}[/]");
                foreach (OfflineBlocker blocker in result.Blockers)
                    _console.MarkupLineInterpolated($"  [yellow]{blocker.Reason}[/]: {blocker.Description}");
            }
            ShowZones();
            ShowCounters();
        }

        // 4. Deflate, online, audit.
        long size = balloon.Pages;
        long returned = balloon.Deflate(size);
        long rssDeflated = _machine.GetStats().HostRssBytes;
        _console.Write(new Rule("The balloon deflates").LeftJustified());
        _console.MarkupLineInterpolated(
            $"Deflate({size:N0} pages) returned {returned:N0} pages to the allocator; they read zero, so the host commits nothing until they are written (host RSS {Units.Rss(rssDeflated)}).");
        if (returned != size || balloon.Pages != 0)
            _problems.Add($"deflate returned {returned} of {size} pages; {balloon.Pages} left");
        if (block is { IsOnline: false })
        {
            Errno online = block.Online();
            _console.MarkupLineInterpolated($"Online of memory{block.Index}: {(online == Errno.None ? "success" : online.ToString())}; zone {block.Zone?.ToString() ?? "none"}.");
            if (online != Errno.None)
                _problems.Add($"onlining memory{block.Index} failed with {online}");
        }
        ShowCounters();
        if (balloon.Inflated != taken || balloon.Deflated != returned)
            _problems.Add($"balloon_inflate {balloon.Inflated} (expected {taken}), balloon_deflate {balloon.Deflated} (expected {returned})");

        IReadOnlyList<string> audit = _machine.Audit();
        _problems.AddRange(audit);
        _console.Write(new Rule("Check").LeftJustified());
        _console.MarkupLine($"Audit (every list, counter, mapcount and refcount recounted): {(audit.Count == 0 ? "[green]clean[/]" : $"[red]{audit.Count} problems[/]")}.");
        foreach (string problem in _problems.Take(10))
            _console.MarkupLineInterpolated($"  [red]{problem}[/]");
        _console.MarkupLineInterpolated($"[grey]balloon demo: {clock.Elapsed.TotalSeconds:F1} s[/]");
        return _problems.Count == 0 ? ExitCodes.Success : ExitCodes.AuditProblem;
    }

    private MemoryBlock? ChooseBlock() =>
        _machine.Hotplug.Blocks
            .Where(b => b.IsOnline && b.Zone == ZoneType.Movable)
            .Select(b => (Block: b, Pages: BalloonPagesIn(b)))
            .Where(x => x.Pages > 0)
            .OrderByDescending(x => x.Pages)
            .Select(x => x.Block)
            .FirstOrDefault();

    private long BalloonPagesIn(MemoryBlock block)
    {
        long n = 0;
        for (long pfn = block.StartPfn; pfn < block.StartPfn + block.Frames; pfn++)
        {
            PageInfo info = _machine.GetPageInfo(pfn);
            if (info.RefCount > 0 && (info.Flags & (PageFlags.Movable | PageFlags.Offline)) == (PageFlags.Movable | PageFlags.Offline))
                n++;
        }
        return n;
    }

    private void ShowZones()
    {
        var table = new Table().AddColumns("node", "zone", "managed MiB", "free MiB");
        for (int c = 2; c < 4; c++)
            table.Columns[c].RightAligned();
        foreach (NodeStats node in _machine.GetStats().Nodes)
            foreach (ZoneStats zone in node.Zones)
                table.AddRow($"Node {node.Node}", zone.Zone.ToString(), $"{zone.ManagedPages * PageSize / (double)Units.MiB:F1}", $"{zone.AllFreePages * PageSize / (double)Units.MiB:F1}");
        _console.Write(table);
    }

    private void ShowCounters()
    {
        var table = new Table().AddColumns("balloon", "value");
        table.Columns[1].RightAligned();
        table.AddRow("pages", _machine.Balloon.Pages.ToString("N0"));
        foreach (string name in (string[])["balloon_inflate", "balloon_deflate", "balloon_migrate"])
        {
            _machine.ReadVmStat(name, out long value);
            table.AddRow(name, value.ToString("N0"));
        }
        _console.Write(table);
    }
}
