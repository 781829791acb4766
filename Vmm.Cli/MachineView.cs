using Spectre.Console;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Cli;

/// <summary>Renders a machine's memory: nodes and zones, memory blocks, buddyinfo.</summary>
internal static class MachineView
{
    public static int Run(MachineOptions options, long touchBytes, IAnsiConsole console)
    {
        using var machine = new Machine(options);
        Topology topology = machine.Topology;
        console.Write(new Rule("[bold]Vmm machine[/]").LeftJustified());
        console.MarkupLineInterpolated(
            $"{topology.NodeCount} nodes x {Mib(topology.FramesPerNode * Topology.PageSize)}, {topology.BlockCount} blocks of {Mib(topology.BlockSizeBytes)}, {topology.TotalFrames:N0} frames of 4 KiB; descriptors {Mib(machine.GetStats().DescriptorBytes)} ({PageDescriptorSize} B per frame)");
        console.MarkupLineInterpolated($"arena: {(machine.Arena.ReturnsMemoryToHost ? "mmap MAP_NORESERVE (decommit returns memory to the host)" : "portable heap")}");
        ShowStats(machine, console, "At boot");
        ShowBlocks(machine, console);

        if (touchBytes > 0)
            Demo(machine, touchBytes, console);
        return 0;
    }

    private const int PageDescriptorSize = 64;

    private static void Demo(Machine machine, long touchBytes, IAnsiConsole console)
    {
        long rssBoot = HostMemory.ReadRssBytes();
        long frames = Math.Min(touchBytes / Topology.PageSize, machine.Topology.TotalFrames / 2);
        var pages = new List<long>((int)frames);
        var random = new Random(42);
        // A mix like a running system's: mostly movable user pages spread over both nodes, some
        // unmovable ones (page tables to come), and a few 2 MiB blocks.
        for (long i = 0; i < frames; i++)
        {
            AllocFlags flags = random.Next(8) == 0 ? AllocFlags.None : AllocFlags.Movable;
            long pfn = machine.Allocator.AllocPages(0, flags, (int)(i % machine.Topology.NodeCount));
            if (pfn == PageAllocator.NoPfn)
                break;
            machine.GetFrameSpan(pfn).Fill((byte)(i | 1));
            pages.Add(pfn);
        }
        long rssTouched = HostMemory.ReadRssBytes();
        ShowStats(machine, console, $"After allocating and writing {pages.Count:N0} pages ({Mib(pages.Count * (long)Topology.PageSize)})");

        int nodes = machine.Topology.NodeCount;
        for (int i = 0; i < pages.Count; i++)
            if ((i / nodes) % 2 == 0)
                machine.Allocator.FreePages(pages[i]);
        ShowStats(machine, console, "After freeing every other page (fragmented: few high-order blocks)");

        for (int i = 0; i < pages.Count; i++)
            if ((i / nodes) % 2 == 1)
                machine.Allocator.FreePages(pages[i]);
        machine.Allocator.DrainAllPages();
        long released = machine.Allocator.ReleaseFreeMemory();
        long rssReleased = HostMemory.ReadRssBytes();
        ShowStats(machine, console, "After freeing the rest (buddies coalesced again)");

        var rss = new Table().AddColumns("host RSS", "bytes");
        rss.AddRow("at boot", Mib(rssBoot));
        rss.AddRow("after writing the pages", Mib(rssTouched));
        rss.AddRow($"after giving {Mib(released)} of free blocks back", Mib(rssReleased));
        console.Write(rss);
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
        for (int order = 0; order <= PageAllocator.MaxOrder; order++)
            buddy.AddColumn(new TableColumn(order.ToString()).RightAligned());
        foreach (ZoneStats zone in stats.Nodes.SelectMany(n => n.Zones))
        {
            var cells = new List<string> { $"Node {zone.Node} {zone.Zone}" };
            for (int order = 0; order <= PageAllocator.MaxOrder; order++)
                cells.Add(order < zone.BuddyInfo.Count ? zone.BuddyInfo[order].ToString() : "-");
            buddy.AddRow([.. cells]);
        }
        console.Write(buddy);
    }

    private static void ShowBlocks(Machine machine, IAnsiConsole console)
    {
        var table = new Table().AddColumns("block", "node", "zone", "pfns", "free", "used");
        for (int block = 0; block < machine.Topology.BlockCount; block++)
        {
            MemoryBlockInfo info = machine.Allocator.GetBlockInfo(block);
            double used = 1 - (double)(info.FreeFrames + info.IsolatedFreeFrames) / info.Frames;
            table.AddRow($"memory{info.Block}", info.Node.ToString(), info.Zone.ToString(),
                $"{info.StartPfn:N0}-{info.StartPfn + info.Frames - 1:N0}", Mib(info.FreeFrames * Topology.PageSize), $"{used:P0}");
        }
        console.Write(table);
    }

    private static string Number(long bytes) => $"{bytes / 1048576.0:N1}";

    private static string Mib(long bytes) => bytes < 0 ? "n/a" : $"{bytes / 1048576.0:N1} MiB";
}
