// HotplugDemo: `vmm hotplug`, memory hot-remove on a busy two-node machine, through the public API only,
// as a host would drive it (what writing "offline" and "online_movable" to
// /sys/devices/system/memory/memoryN/state does on Linux).
//
// The story:
//   1. Processes (home node 0) each write a buffer: half of it the same in every process, which ksmd
//      merges into KSM pages; half private, which a writer thread per process keeps rewriting from now
//      to the end. Tables: each node's zones (managed, free) and the memory blocks (state, valid_zones,
//      and how many of the processes' pages and KSM pages each holds).
//   2. The ZONE_MOVABLE block holding most of their pages goes offline, with a progress bar: every page
//      migrates to the other node (KSM pages keep their sharing) while the writers write. The tables
//      again, and the KSM counters, which must be what they were.
//   3. A page of another movable block is pinned (pin_user_pages, as a device doing DMA would):
//      CanOffline (the dry run) names the pin, its process and address; an offline with
//      offline_migrate_max_passes set gives up with EBUSY and says the same. The pin is released, the dry
//      run agrees the block could go now, and the first block comes online again (in its default zone).
//   4. The writers stop, every byte of every buffer is compared with what it must hold, and the machine
//      audits itself. A wrong byte, a failed offline, a pin that did not stop one, lost KSM sharing or
//      an Audit problem make the exit code 1.
using System.Diagnostics;
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>The options of `vmm hotplug`.</summary>
/// <param name="Processes">processes, each with a writer thread.</param>
/// <param name="ProcessMib">MiB of each process's buffer (half merged, half private).</param>
/// <param name="MaxPasses">offline_migrate_max_passes for the offline the pin must stop.</param>
/// <param name="TimeoutSeconds">how long KSM may take to merge, and the offline to finish.</param>
internal sealed record HotplugDemoOptions(int Processes, int ProcessMib, int MaxPasses, int TimeoutSeconds)
{
    /// <summary>Checks the options against the machine; throws UsageException (exit code 2).</summary>
    public void Validate(MachineOptions machine)
    {
        if (Processes < 2 || ProcessMib < 1 || MaxPasses < 1 || TimeoutSeconds < 1)
            throw new UsageException("--processes must be at least 2, --process-mib, --max-passes and --timeout-seconds at least 1");
        long blocksPerNode = machine.NodeSizeBytes / machine.BlockSizeBytes;
        if (blocksPerNode < 2)
            throw new UsageException(
                $"--node-size-mib ({machine.NodeSizeBytes / Units.MiB}) must hold at least two blocks of --block-size-mib ({machine.BlockSizeBytes / Units.MiB}): one in ZONE_NORMAL, one in ZONE_MOVABLE to take offline");
        // Every buffer starts on node 0 and may all move to node 1: they must fit in half a node.
        long wanted = (long)Processes * ProcessMib * Units.MiB;
        if (wanted > machine.NodeSizeBytes / 2)
            throw new UsageException(
                $"{Processes} buffers of {ProcessMib} MiB must fit in half a node ({machine.NodeSizeBytes / Units.MiB / 2} MiB): lower --processes or --process-mib, or raise --node-size-mib");
    }
}

/// <summary>Runs the hot-remove demo on a fresh two-node machine.</summary>
internal sealed partial class HotplugDemo
{
    private const int PageSize = Topology.PageSize;

    /// <summary>How often the progress bar looks at the block while it empties.</summary>
    private static readonly TimeSpan ProgressInterval = TimeSpan.FromMilliseconds(10);

    private readonly Machine _machine;
    private readonly Ksm _ksm;
    private readonly IAnsiConsole _console;
    private readonly HotplugDemoOptions _options;
    private readonly List<DemoProcess> _processes = [];
    private readonly List<string> _problems = [];

    private HotplugDemo(Machine machine, HotplugDemoOptions options, IAnsiConsole console)
    {
        _machine = machine;
        _ksm = machine.Ksm ?? throw new InvalidOperationException("the machine was built without KSM");
        _options = options;
        _console = console;
    }

    /// <summary>Builds the machine (two nodes), runs the demo and returns the exit code (1: a wrong byte, a failed step or an Audit problem).</summary>
    public static int Run(MachineOptions machineOptions, HotplugDemoOptions options, IAnsiConsole console)
    {
        options.Validate(machineOptions);
        using Machine machine = Usage.CreateMachine(machineOptions);
        return new HotplugDemo(machine, options, console).Run();
    }

    private int Run()
    {
        var clock = Stopwatch.StartNew();
        try
        {
            CreateProcesses();
            bool merged = Merge();
            foreach (DemoProcess process in _processes)
                process.Start();

            MemoryBlock? block = ChooseBlock();
            Show("Before: a busy machine", block);
            if (block is not null)
            {
                TakeOffline(block, merged);
                PinStopsAnOffline(block);
                OnlineAgain(block);
            }
            else
            {
                _problems.Add("no online ZONE_MOVABLE block to take offline");
            }
        }
        finally
        {
            foreach (DemoProcess process in _processes)
                process.Stop();
        }
        if (_processes.FirstOrDefault(p => p.Failure is not null) is { } failed)
            throw new InvalidOperationException($"the writer of P{failed.Index + 1} failed: {failed.Failure!.Message}", failed.Failure);
        return Finish(clock);
    }

    private TimeSpan Timeout => TimeSpan.FromSeconds(_options.TimeoutSeconds);

    // ---- 1. a busy machine -------------------------------------------------------------------------

    private void CreateProcesses()
    {
        Topology topology = _machine.Topology;
        _console.Write(new Rule("[bold]Vmm: memory hot-remove[/]").LeftJustified());
        _console.MarkupLineInterpolated(
            $"A machine of {topology.NodeCount} nodes x {Units.Mib(topology.FramesPerNode * PageSize)} in blocks of {Units.Mib(topology.BlockSizeBytes)} (the hotplug unit); {_options.Processes} processes on node 0 write {_options.ProcessMib} MiB each: the first half the same in all of them (MADV_MERGEABLE: ksmd merges it), the second half private, rewritten by a writer thread per process until the end.");
        int pages = (int)((long)_options.ProcessMib * Units.MiB / PageSize);
        for (int i = 0; i < _options.Processes; i++)
        {
            VmProcess process = _machine.CreateProcess(homeNode: 0);
            ulong va = process.Mmap((ulong)pages * PageSize);
            var demo = new DemoProcess(i, process, va, pages);
            demo.Fill();
            Check(process.Madvise(va, (ulong)demo.SharedPages * PageSize, Advice.Mergeable), $"P{i + 1}: madvise(MADV_MERGEABLE)");
            _processes.Add(demo);
        }
    }

    /// <summary>ksmd merges the identical halves; true when pages_sharing reached what full merging gives.</summary>
    private bool Merge()
    {
        long shared = _processes[0].SharedPages;
        long expected = shared * (_processes.Count - 1);
        long pagesToScan = Math.Max(256, shared * _processes.Count / 4);
        SetKnob("pages_to_scan", pagesToScan.ToString());
        SetKnob("sleep_millisecs", "10");
        SetKnob("run", "1");
        var clock = Stopwatch.StartNew();
        KsmStats stats = _ksm.GetStats();
        while (stats.PagesSharing < expected && clock.Elapsed < Timeout)
        {
            Thread.Sleep(20);
            stats = _ksm.GetStats();
        }
        bool merged = stats.PagesSharing >= expected;
        string verdict = merged ? "[green]merged[/]" : $"[yellow]not fully merged within {_options.TimeoutSeconds} s[/] (raise --timeout-seconds)";
        _console.MarkupLine(
            $"ksmd (run=1, pages_to_scan={pagesToScan:N0}, sleep_millisecs=10): pages_shared {stats.PagesShared:N0}, pages_sharing {stats.PagesSharing:N0} of {expected:N0} after {clock.Elapsed.TotalSeconds:F1} s: {verdict}; it keeps running.");
        return merged;
    }

    private void SetKnob(string knob, string value) => Check(_ksm.Write(knob, value), $"writing {value} to {knob}");

    /// <summary>The online ZONE_MOVABLE block that holds most of the processes' pages (the lowest on a tie).</summary>
    private MemoryBlock? ChooseBlock()
    {
        Census census = TakeCensus();
        MemoryBlock? best = null;
        foreach (MemoryBlock block in _machine.Hotplug.Blocks)
        {
            if (block.Zone != ZoneType.Movable)
                continue;
            if (best is null || census.Pages[block.Index] > census.Pages[best.Index])
                best = block;
        }
        return best;
    }

    // ---- 2. offline --------------------------------------------------------------------------------

    /// <summary>Takes <paramref name="block"/> offline with a progress bar, then shows the machine after.</summary>
    private void TakeOffline(MemoryBlock block, bool merged)
    {
        KsmStats ksmBefore = _ksm.GetStats();
        Census before = TakeCensus();
        long writesBefore = _processes.Sum(p => p.Writes);
        long inUse = InUse(block);
        _console.Write(new Rule($"Offline of memory{block.Index} (node {block.Node}, {block.Zone}): {inUse:N0} frames in use, {before.Pages[block.Index]:N0} of them the processes' pages, {before.KsmPages[block.Index]:N0} KSM pages").LeftJustified());

        var reports = new List<OfflineProgress>();
        OfflineResult? result = null;
        new ProgressRunner(_console).Run(($"memory{block.Index}", inUse, sink => result = OfflineWithBar(block, inUse, sink, reports)));
        OfflineResult done = result!;
        long writes = _processes.Sum(p => p.Writes) - writesBefore;
        foreach (OfflineProgress report in reports.Where(r => r.PagesLeft > 0))
            _console.MarkupLineInterpolated($"  pass {report.Pass}: {report.PagesMoved:N0} pages moved, {FramesText(report.PagesLeft)} still in use");

        if (!done.Succeeded)
        {
            string why = done.Error == Errno.EINTR ? $" (cancelled: it outlasted --timeout-seconds {_options.TimeoutSeconds})" : "";
            _problems.Add($"the offline of memory{block.Index} failed with {ErrnoName(done.Error)}{why}");
            _console.MarkupLineInterpolated($"[red]offline of memory{block.Index} failed: {ErrnoName(done.Error)}[/] after {done.Passes} passes, {done.PagesMoved:N0} pages moved:");
            ShowBlockers(done.Blockers);
            return;
        }
        _console.MarkupLineInterpolated(
            $"memory{block.Index} is [green]{block.State}[/]: {done.PagesMoved:N0} pages moved in {Passes(done.Passes)}, {done.Elapsed.TotalMilliseconds:F1} ms; the writers wrote {writes:N0} times meanwhile. Its memory went back to the host.");
        Show($"After memory{block.Index} went offline", block);

        KsmStats after = _ksm.GetStats();
        bool kept = after.PagesShared == ksmBefore.PagesShared && after.PagesSharing == ksmBefore.PagesSharing;
        var table = new Table().AddColumns("KSM", "before", "after");
        table.Columns[1].RightAligned();
        table.Columns[2].RightAligned();
        table.AddRow("pages_shared", ksmBefore.PagesShared.ToString("N0"), after.PagesShared.ToString("N0"));
        table.AddRow("pages_sharing", ksmBefore.PagesSharing.ToString("N0"), after.PagesSharing.ToString("N0"));
        table.AddRow("general_profit", Units.Mib(ksmBefore.GeneralProfit), Units.Mib(after.GeneralProfit));
        table.AddRow("full_scans", ksmBefore.FullScans.ToString("N0"), after.FullScans.ToString("N0"));
        _console.Write(table);
        _console.MarkupLine($"KSM counters kept: {(kept ? "[green]yes[/]" : "[red]no[/]")} (the {before.KsmPages[block.Index]:N0} KSM pages of memory{block.Index} moved with their sharing; KSM's memory callback pruned the stable nodes that pointed into the block).");
        if (!kept && merged)
            _problems.Add($"KSM sharing changed across the offline: pages_shared {ksmBefore.PagesShared} -> {after.PagesShared}, pages_sharing {ksmBefore.PagesSharing} -> {after.PagesSharing}");
    }

    /// <summary>
    /// Runs the offline on a thread of its own and moves the bar as the block empties: the frames in use
    /// are counted every few milliseconds (each pass reports only when it ends, and one pass usually
    /// moves everything). The offline is cancelled (EINTR) if it outlasts --timeout-seconds.
    /// </summary>
    private OfflineResult OfflineWithBar(MemoryBlock block, long total, IProgressSink sink, List<OfflineProgress> reports)
    {
        var progress = new Reports(reports);
        using var cancel = new CancellationTokenSource(Timeout);
        Task<OfflineResult> offline = Task.Factory.StartNew(() => block.Offline(progress, cancel.Token), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
        long shown = 0;
        void MoveTo(long done)
        {
            done = Math.Clamp(done, 0, total);
            if (done > shown)
            {
                sink.Advance(done - shown);
                shown = done;
            }
        }
        while (!offline.Wait(ProgressInterval))
            MoveTo(Math.Max(total - InUse(block), progress.LastMoved));
        OfflineResult result = offline.GetAwaiter().GetResult();
        if (result.Succeeded)
            MoveTo(total);
        return result;
    }

    /// <summary>The offline's reports, as they come (called on the offline's thread, so no SynchronizationContext).</summary>
    private sealed class Reports(List<OfflineProgress> reports) : IProgress<OfflineProgress>
    {
        private long _lastMoved;

        public long LastMoved => Interlocked.Read(ref _lastMoved);

        public void Report(OfflineProgress value)
        {
            lock (reports)
                reports.Add(value);
            Interlocked.Exchange(ref _lastMoved, value.PagesMoved);
        }
    }

    /// <summary>Frames of an online block that are not free (0 for an offline block).</summary>
    private long InUse(MemoryBlock block)
    {
        if (!block.IsOnline)
            return 0;
        MemoryBlockInfo info = _machine.GetMemoryBlock(block.Index);
        return info.Frames - info.FreeFrames - info.IsolatedFreeFrames;
    }

    // ---- 3. a pin stops an offline; online again ---------------------------------------------------

    /// <summary>
    /// Pins one private page of P1 that lives in another online movable block, and shows that block's
    /// dry run and offline both fail, naming the pin; then releases it.
    /// </summary>
    private void PinStopsAnOffline(MemoryBlock offlined)
    {
        DemoProcess p1 = _processes[0];
        ulong? address = null;
        for (int own = 0; own < p1.PrivatePages && address is null; own++)
        {
            ulong va = p1.PrivateAddress + (ulong)own * PageSize;
            PagemapEntry entry = p1.Process.GetPagemap(va);
            if (entry.Present && BlockOf(entry.Pfn) is { } b && b != offlined && b.Zone == ZoneType.Movable)
                address = va;
        }
        if (address is not { } pinnedVa)
        {
            _problems.Add("no private page of P1 in another online ZONE_MOVABLE block to pin");
            return;
        }

        PinnedMemory pin = p1.Process.Pin(pinnedVa, PageSize, write: false);
        long pfn = pin.FrameOf(0);
        MemoryBlock block = BlockOf(pfn)!;
        try
        {
            _console.Write(new Rule($"A pinned page keeps memory{block.Index} (node {block.Node}, {block.Zone}) online").LeftJustified());
            _console.MarkupLineInterpolated(
                $"P1 (pid {p1.Process.Pid}) pins its page at 0x{pinnedVa:x} (frame {pfn:N0}, in memory{block.Index}) with pin_user_pages, as a device doing DMA would; its writer keeps writing to it.");

            bool could = block.CanOffline(out IReadOnlyList<OfflineBlocker> dryRun);
            _console.MarkupLineInterpolated($"CanOffline(memory{block.Index}) (a dry run, changes nothing): {(could ? "yes" : "no")}");
            ShowBlockers(dryRun);
            if (could || !NamesPin(dryRun, pfn, p1.Process.Pid, pinnedVa))
                _problems.Add($"CanOffline(memory{block.Index}) did not name the pin of frame {pfn}");

            int passesBefore = _machine.Hotplug.OfflineMigrateMaxPasses;
            _machine.Hotplug.OfflineMigrateMaxPasses = _options.MaxPasses;
            var reports = new List<OfflineProgress>();
            OfflineResult result;
            try
            {
                result = block.Offline(new Reports(reports));
            }
            finally
            {
                _machine.Hotplug.OfflineMigrateMaxPasses = passesBefore;
            }
            _console.MarkupLineInterpolated(
                $"Offline of memory{block.Index} with offline_migrate_max_passes = {_options.MaxPasses}: {ErrnoName(result.Error)} after {Passes(result.Passes)}, {result.Elapsed.TotalMilliseconds:F1} ms; state {block.State}. Its other {result.PagesMoved:N0} pages moved out (and stay moved); the pinned one could not:");
            foreach (OfflineProgress report in reports)
                _console.MarkupLineInterpolated($"  pass {report.Pass}: {report.PagesMoved:N0} pages moved, {FramesText(report.PagesLeft)} still in use");
            ShowBlockers(result.Blockers);
            if (result.Succeeded)
            {
                _problems.Add($"memory{block.Index} went offline although frame {pfn} was pinned");
                Check(block.Online(), $"onlining memory{block.Index} again");
            }
            else if (result.Error != Errno.EBUSY || !NamesPin(result.Blockers, pfn, p1.Process.Pid, pinnedVa))
            {
                _problems.Add($"the offline of memory{block.Index} failed with {ErrnoName(result.Error)}, not EBUSY naming the pin of frame {pfn}");
            }
        }
        finally
        {
            pin.Dispose();
        }
        bool now = block.CanOffline(out IReadOnlyList<OfflineBlocker> left);
        _console.MarkupLineInterpolated($"The pin released: CanOffline(memory{block.Index}): {(now ? "yes" : "no")}.");
        ShowBlockers(left);
        if (!now)
            _problems.Add($"memory{block.Index} still cannot go offline after the pin was released");
    }

    /// <summary>
    /// True if <paramref name="blockers"/> say frame <paramref name="pfn"/> is pinned, and name the process
    /// and address that map it, or no process at all (the explanation only tries the page lock, so a page
    /// locked at that moment is named without its process) but never another one.
    /// </summary>
    private static bool NamesPin(IReadOnlyList<OfflineBlocker> blockers, long pfn, int pid, ulong address) =>
        blockers.Any(b => b.Pfn == pfn && b.Reason == OfflineBlockReason.Pinned && (b.Pid == -1 || (b.Pid == pid && b.Address == address)));

    private void ShowBlockers(IReadOnlyList<OfflineBlocker> blockers)
    {
        foreach (OfflineBlocker blocker in blockers)
            _console.MarkupLineInterpolated($"  [yellow]{blocker.Reason}[/]: {blocker.Description}");
    }

    /// <summary>Brings <paramref name="block"/> online again, in its default zone (the first of valid_zones).</summary>
    private void OnlineAgain(MemoryBlock block)
    {
        if (block.IsOnline)
            return; // its offline failed (a problem already)
        string validZones = block.ValidZones;
        Errno error = block.Online();
        _console.Write(new Rule($"memory{block.Index} online again").LeftJustified());
        _console.MarkupLineInterpolated(
            $"Online of memory{block.Index} (valid_zones \"{validZones}\": the first is the default): {ErrnoName(error)}; state {block.State}, zone {block.Zone?.ToString() ?? "none"}. Its memory comes back from the host as it is used.");
        if (error != Errno.None)
            _problems.Add($"onlining memory{block.Index} failed with {ErrnoName(error)}");
        Show($"After memory{block.Index} came online", block);
    }

    // ---- 4. the end --------------------------------------------------------------------------------

    private int Finish(Stopwatch clock)
    {
        long writes = _processes.Sum(p => p.Writes);
        List<string> contents = [.. _processes.Select(p => p.Problem).OfType<string>()];
        if (contents.Count == 0)
            contents.AddRange(_processes.Select(p => p.Verify()).OfType<string>());
        _problems.AddRange(contents);
        SetKnob("run", "0");
        IReadOnlyList<string> audit = _machine.Audit();
        _problems.AddRange(audit);

        _console.Write(new Rule("Check").LeftJustified());
        _console.MarkupLineInterpolated($"The writers wrote {writes:N0} times in all.");
        _console.MarkupLine(
            $"Every byte the writers wrote read back: {(contents.Count == 0 ? "[green]yes[/]" : "[red]no[/]")}. Audit (every list, counter, mapcount and refcount recounted): {(audit.Count == 0 ? "[green]clean[/]" : $"[red]{audit.Count} problems[/]")}.");
        foreach (string problem in _problems.Take(10))
            _console.MarkupLineInterpolated($"  [red]{problem}[/]");
        _console.MarkupLineInterpolated($"[grey]hotplug demo: {clock.Elapsed.TotalSeconds:F1} s[/]");
        return _problems.Count == 0 ? ExitCodes.Success : ExitCodes.AuditProblem;
    }

    // ---- showing -----------------------------------------------------------------------------------

    /// <summary>Where the processes' pages are: per block, their pages and the KSM pages among them (each counted once).</summary>
    private sealed record Census(long[] Pages, long[] KsmPages);

    private Census TakeCensus()
    {
        int blocks = _machine.Topology.BlockCount;
        var pages = new long[blocks];
        var ksm = new long[blocks];
        var seen = new HashSet<long>();
        foreach (DemoProcess process in _processes)
        {
            for (int p = 0; p < process.Pages; p++)
            {
                PagemapEntry entry = process.Process.GetPagemap(process.Address + (ulong)p * PageSize);
                if (!entry.Present || entry.ZeroPage || !seen.Add(entry.Pfn))
                    continue;
                int block = (int)(entry.Pfn / _machine.Topology.FramesPerBlock);
                pages[block]++;
                if (entry.Ksm)
                    ksm[block]++;
            }
        }
        return new Census(pages, ksm);
    }

    private MemoryBlock? BlockOf(long pfn)
    {
        long index = pfn / _machine.Topology.FramesPerBlock;
        return index < _machine.Hotplug.Blocks.Count ? _machine.Hotplug.Blocks[(int)index] : null;
    }

    /// <summary>The machine's memory per node and zone (managed, free), then the block list.</summary>
    private void Show(string title, MemoryBlock? highlight)
    {
        _console.Write(new Rule(Markup.Escape(title)).LeftJustified());
        MachineStats stats = _machine.GetStats();
        var zones = new Table().AddColumns("node", "zone", "managed MiB", "free MiB", "used MiB");
        for (int c = 2; c < 5; c++)
            zones.Columns[c].RightAligned();
        foreach (NodeStats node in stats.Nodes)
        {
            foreach (ZoneStats zone in node.Zones)
            {
                long free = zone.AllFreePages;
                zones.AddRow($"Node {node.Node}", zone.Zone.ToString(), Mib(zone.ManagedPages), Mib(free), Mib(zone.ManagedPages - free));
            }
            long managed = node.Zones.Sum(z => z.ManagedPages), nodeFree = node.Zones.Sum(z => z.AllFreePages);
            zones.AddRow($"Node {node.Node}", "all", Mib(managed), Mib(nodeFree), Mib(managed - nodeFree));
        }
        _console.Write(zones);

        Census census = TakeCensus();
        var blocks = new Table().AddColumns("block", "node", "zone", "state", "valid_zones", "used MiB", "process pages", "KSM pages");
        for (int c = 5; c < 8; c++)
            blocks.Columns[c].RightAligned();
        foreach (MemoryBlock block in _machine.Hotplug.Blocks)
        {
            string name = block == highlight ? $"memory{block.Index} *" : $"memory{block.Index}";
            blocks.AddRow(name, block.Node.ToString(), block.Zone?.ToString() ?? "-", block.State, block.ValidZones,
                block.IsOnline ? Mib(InUse(block)) : "-", census.Pages[block.Index].ToString("N0"), census.KsmPages[block.Index].ToString("N0"));
        }
        _console.Write(blocks);
        if (highlight is not null)
            _console.MarkupLineInterpolated($"[grey](* memory{highlight.Index}: the block this demo takes offline and onlines again.)[/]");
    }

    private static string Mib(long pages) => $"{pages * PageSize / (double)Units.MiB:N1}";

    private static string FramesText(long frames) => frames == 1 ? "1 frame" : $"{frames:N0} frames";

    private static string Passes(int passes) => passes == 1 ? "1 pass" : $"{passes} passes";

    /// <summary>An error as Linux names it: EBUSY; None as "success".</summary>
    private static string ErrnoName(Errno error) => error == Errno.None ? "success" : error.ToString();

    /// <summary>A call the demo needs: any error is a bug of Vmm (exit 3 through the guard).</summary>
    private static void Check(Errno error, string what)
    {
        if (error != Errno.None)
            throw new InvalidOperationException($"{what} failed: {error}");
    }
}
