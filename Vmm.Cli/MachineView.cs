// MachineView: `vmm machine`, and the short fork demo at the end of `vmm`. The machine's memory as
// Linux shows it (zones with watermarks and pgalloc/pgfree, memory blocks, /proc/buddyinfo); then a
// parent that writes its memory and forks twice, children whose writes copy on write, the host's RSS
// as the processes exit and free blocks go back, and an Audit.
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>
/// Renders a machine's memory: nodes and zones, memory blocks, buddyinfo; and the fork demo: a parent
/// writes its memory and forks twice, the children write and copy-on-write gives them their own pages.
/// </summary>
internal static class MachineView
{
    /// <summary>Returns the exit code: 1 if the audit at the end found a problem.</summary>
    /// <param name="options">the machine's shape.</param>
    /// <param name="touchBytes">what the fork demo's parent writes (0: no fork demo).</param>
    /// <param name="console">where to draw.</param>
    /// <param name="showTables">the zone, block and buddyinfo tables (`vmm machine`), or only the fork demo.</param>
    public static int Run(MachineOptions options, long touchBytes, IAnsiConsole console, bool showTables)
    {
        using Machine machine = Usage.CreateMachine(options);
        Topology topology = machine.Topology;
        console.Write(new Rule(showTables ? "[bold]Vmm machine[/]" : "[bold]Fork and copy-on-write[/]").LeftJustified());
        console.MarkupLineInterpolated(
            $"{topology.NodeCount} nodes x {Mib(topology.FramesPerNode * Topology.PageSize)}, {topology.BlockCount} blocks of {Mib(topology.BlockSizeBytes)}, {topology.TotalFrames:N0} frames of 4 KiB; descriptors committed {Mib(machine.GetStats().DescriptorBytes)} of {Mib(topology.TotalFrames * PageDescriptorSize)} ({PageDescriptorSize} B per frame, a section at a time as memory is used)");
        console.MarkupLineInterpolated($"arena: {(machine.ReturnsMemoryToHost ? "mmap MAP_NORESERVE (decommit returns memory to the host)" : "portable heap")}");
        if (showTables)
        {
            ShowStats(machine, console, "At boot");
            ShowBlocks(machine, console);
        }
        return touchBytes > 0 ? Demo(machine, touchBytes, console, showTables) : ExitCodes.Success;
    }

    private const int PageDescriptorSize = 64;

    private static int Demo(Machine machine, long touchBytes, IAnsiConsole console, bool showTables)
    {
        long rssBoot = machine.GetStats().HostRssBytes;
        ulong bytes = (ulong)Math.Min(touchBytes, machine.Topology.TotalBytes / 4) & ~((ulong)Topology.PageSize - 1);
        ulong pages = bytes / Topology.PageSize;

        // A parent writes its memory, then forks two children: all three share every page copy-on-write.
        VmProcess parent = machine.CreateProcess(homeNode: 0);
        ulong va = parent.Mmap(bytes);
        for (ulong page = 0; page < pages; page++)
            parent.Write(va + page * Topology.PageSize, (page * 2654435761UL) | 1);
        VmProcess left = parent.Fork();
        VmProcess right = parent.Fork();
        ShowProcesses(machine, console, [parent, left, right], va, pages,
            $"A parent wrote {bytes >> 20} MiB, then forked twice: every page is shared copy-on-write");

        // Each child writes to part of its memory: each write to a shared page copies it.
        for (ulong page = 0; page < pages / 2; page++)
            left.Write<byte>(va + page * Topology.PageSize, 0xAA);
        for (ulong page = 0; page < pages / 4; page++)
            right.Write<byte>(va + page * Topology.PageSize + 8, 0xBB);
        ShowProcesses(machine, console, [parent, left, right], va, pages,
            "The left child wrote half of its pages, the right child a quarter: copy-on-write gave them their own");
        console.MarkupLineInterpolated($"copy-on-write copies: {machine.GetVmStats().CowFaults:N0}; the parent still reads its own data: {parent.Read<ulong>(va) == 1}");

        long rssTouched = machine.GetStats().HostRssBytes;
        foreach (VmProcess p in new[] { parent, left, right })
            p.Exit();
        long released = machine.ReleaseFreeMemory();
        long rssReleased = machine.GetStats().HostRssBytes;
        if (showTables)
            ShowStats(machine, console, "After every process exited (every frame free again)");

        var rss = new Table().AddColumns("host RSS", "bytes");
        rss.AddRow("at boot", Mib(rssBoot));
        rss.AddRow("with the three processes", Mib(rssTouched));
        rss.AddRow($"after giving {Mib(released)} of free blocks back", Mib(rssReleased));
        console.Write(rss);
        IReadOnlyList<string> audit = machine.Audit();
        console.MarkupLineInterpolated($"Audit: {(audit.Count == 0 ? "every counter, mapcount and refcount recounted from the page tables: clean" : string.Join("; ", audit.Take(3)))}");
        return audit.Count == 0 ? ExitCodes.Success : ExitCodes.AuditProblem;
    }

    private static void ShowProcesses(Machine machine, IAnsiConsole console, VmProcess[] processes, ulong va, ulong pages, string title)
    {
        console.Write(new Rule(title).LeftJustified());
        var table = new Table().AddColumns("pid", "RSS anon", "shared pages", "private pages", "page tables", "node 0 / node 1 pages");
        foreach (VmProcess p in processes)
        {
            long shared = 0, exclusive = 0, node0 = 0, node1 = 0;
            for (ulong page = 0; page < pages; page++)
            {
                PagemapEntry entry = p.GetPagemap(va + page * Topology.PageSize);
                if (!entry.Present)
                    continue;
                if (entry.MapCount > 1)
                    shared++;
                else
                    exclusive++;
                if (entry.Node == 0)
                    node0++;
                else
                    node1++;
            }
            table.AddRow(p.Pid.ToString(), Mib(p.RssAnonPages * Topology.PageSize), shared.ToString("N0"), exclusive.ToString("N0"),
                p.PageTablePages.ToString(), $"{node0:N0} / {node1:N0}");
        }
        console.Write(table);
        MachineStats stats = machine.GetStats();
        console.MarkupLineInterpolated($"machine: {Mib(stats.MemTotalBytes - stats.MemFreeBytes)} of {Mib(stats.MemTotalBytes)} in use; the three processes map {Mib(processes.Sum(p => p.RssAnonPages) * Topology.PageSize)}");
    }

    private static void ShowStats(Machine machine, IAnsiConsole console, string title)
    {
        MachineStats stats = machine.GetStats();
        console.Write(new Rule(title).LeftJustified());
        var table = new Table().AddColumns("node", "zone", "MiB", "free MiB", "pcp", "isol", "wmark min/low/high", "pgalloc", "pgfree");
        foreach (ZoneStats zone in stats.Nodes.SelectMany(n => n.Zones))
        {
            table.AddRow(zone.Node.ToString(), zone.Zone.ToString(), Number(zone.ManagedPages * Topology.PageSize),
                Number(zone.FreePages * Topology.PageSize), zone.PcpPages.ToString("N0"), zone.IsolatedFreePages.ToString("N0"),
                $"{zone.Watermarks.Min}/{zone.Watermarks.Low}/{zone.Watermarks.High}", zone.PgAlloc.ToString("N0"), zone.PgFree.ToString("N0"));
        }
        table.AddRow("all", "", Number(stats.MemTotalBytes), Number(stats.MemFreeBytes), "", "", "", "", "");
        console.Write(table);

        // /proc/buddyinfo: free blocks per order.
        var buddy = new Table().AddColumn("buddyinfo (free blocks of order)");
        for (int order = 0; order <= MaxBuddyOrder; order++)
            buddy.AddColumn(new TableColumn(order.ToString()).RightAligned());
        foreach (ZoneStats zone in stats.Nodes.SelectMany(n => n.Zones))
        {
            var cells = new List<string> { $"Node {zone.Node} {zone.Zone}" };
            for (int order = 0; order <= MaxBuddyOrder; order++)
                cells.Add(order < zone.BuddyInfo.Count ? zone.BuddyInfo[order].ToString() : "-");
            buddy.AddRow([.. cells]);
        }
        console.Write(buddy);
    }

    private const int MaxBuddyOrder = 10; // Linux x86-64 MAX_PAGE_ORDER: the widest buddyinfo row

    private static void ShowBlocks(Machine machine, IAnsiConsole console)
    {
        var table = new Table().AddColumns("block", "node", "zone", "pfns", "free", "used");
        for (int block = 0; block < machine.Topology.BlockCount; block++)
        {
            MemoryBlockInfo info = machine.GetMemoryBlock(block);
            double used = 1 - (double)(info.FreeFrames + info.IsolatedFreeFrames) / info.Frames;
            table.AddRow($"memory{info.Block}", info.Node.ToString(), info.Zone.ToString(),
                $"{info.StartPfn:N0}-{info.StartPfn + info.Frames - 1:N0}", Mib(info.FreeFrames * Topology.PageSize), $"{used:P0}");
        }
        console.Write(table);
    }

    private static string Number(long bytes) => $"{bytes / 1048576.0:N1}";

    private static string Mib(long bytes) => bytes < 0 ? "n/a" : $"{bytes / 1048576.0:N1} MiB";
}
