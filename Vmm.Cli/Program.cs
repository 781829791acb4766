// vmm: the command-line face of Vmm. With no arguments it builds a machine on built-in defaults
// (2 NUMA nodes x 512 MiB in 128 MiB blocks) and shows it: nodes, zones, memory blocks, free memory
// and /proc/buddyinfo. Then processes: one writes its memory and forks twice, the children write and
// copy-on-write gives them their own pages; memory per process, the host's RSS, and an Audit.
// Later mechanisms (KSM, migration) grow it into the full demo.
using System.CommandLine;
using Spectre.Console;

namespace Vmm.Cli;

internal static class Program
{
    private static int Main(string[] args)
    {
        var nodes = new Option<int>("--nodes") { Description = "NUMA nodes", DefaultValueFactory = _ => 2 };
        var nodeSize = new Option<int>("--node-size-mib") { Description = "MiB per node", DefaultValueFactory = _ => 512 };
        var blockSize = new Option<int>("--block-size-mib") { Description = "MiB per memory block (hotplug unit)", DefaultValueFactory = _ => 128 };
        var touch = new Option<int>("--touch-mib") { Description = "MiB the demo's first process writes (0: only show the machine)", DefaultValueFactory = _ => 64 };

        var root = new RootCommand("Vmm: an in-process virtual memory manager over real unmanaged memory.")
        {
            nodes, nodeSize, blockSize, touch,
        };
        root.SetAction(parse =>
        {
            var options = new MachineOptions
            {
                NodeCount = parse.GetValue(nodes),
                NodeSizeBytes = (long)parse.GetValue(nodeSize) << 20,
                BlockSizeBytes = (long)parse.GetValue(blockSize) << 20,
            };
            try
            {
                return MachineView.Run(options, (long)parse.GetValue(touch) << 20, AnsiConsole.Console);
            }
            catch (ArgumentException e)
            {
                AnsiConsole.MarkupLineInterpolated($"[red]error:[/] {e.Message}");
                return 2;
            }
        });
        return root.Parse(args).Invoke();
    }
}
