// vmm: the command-line face of Vmm.
//
//   vmm                  the demo, on built-in defaults (2 NUMA nodes x 512 MiB in 128 MiB blocks):
//                        KSM merging duplicate-rich buffers of several processes with a live view, then
//                        writes that break sharing (KsmDemo); then, briefly, fork and copy-on-write
//                        (MachineView). Each part ends with an Audit; a problem makes the exit code 1.
//   vmm dedupe PATH...   loads real files into mergeable memory and reports what KSM saves (DedupeCommand).
//   vmm machine          the machine's tables (nodes, zones, memory blocks, buddyinfo) and the fork demo.
//
// Exit codes: 0 success, 1 an audit found a problem, 2 bad arguments.
using System.CommandLine;
using Spectre.Console;

namespace Vmm.Cli;

internal static class Program
{
    private const int BadArguments = 2;

    private static readonly Option<int> Nodes = new("--nodes") { Description = "NUMA nodes", DefaultValueFactory = _ => 2 };
    private static readonly Option<int> NodeSize = new("--node-size-mib") { Description = "MiB per node", DefaultValueFactory = _ => 512 };
    private static readonly Option<int> BlockSize = new("--block-size-mib") { Description = "MiB per memory block (hotplug unit)", DefaultValueFactory = _ => 128 };
    private static readonly Option<int> Touch = new("--touch-mib") { Description = "MiB the fork demo's first process writes (0: skip the fork demo)", DefaultValueFactory = _ => 32 };

    private static int Main(string[] args)
    {
        AnsiConsole.Console = CreateConsole();
        RootCommand root = BuildRoot();
        ParseResult parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            foreach (System.CommandLine.Parsing.ParseError error in parse.Errors)
                AnsiConsole.MarkupLineInterpolated($"[red]error:[/] {error.Message}");
            AnsiConsole.MarkupLine("Run [bold]vmm --help[/] for the options.");
            return BadArguments;
        }
        return parse.Invoke();
    }

    /// <summary>
    /// The terminal's console; or, when stdout is a pipe or a file (CI logs), one without escape codes
    /// or live redraws, 120 columns wide so that the per-scan lines and tables do not wrap.
    /// </summary>
    private static IAnsiConsole CreateConsole()
    {
        if (!Console.IsOutputRedirected)
            return AnsiConsole.Console;
        IAnsiConsole console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.No,
            ColorSystem = ColorSystemSupport.NoColors,
            Interactive = InteractionSupport.No,
        });
        console.Profile.Width = 120;
        return console;
    }

    private static RootCommand BuildRoot()
    {
        var processes = new Option<int>("--processes") { Description = "processes in the KSM demo, each with one buffer", DefaultValueFactory = _ => 4 };
        var bufferMib = new Option<int>("--buffer-mib") { Description = "MiB per process buffer in the KSM demo", DefaultValueFactory = _ => 32 };
        var useZeroPages = new Option<bool>("--use-zero-pages") { Description = "KSM's use_zero_pages: zero pages become the zero page" };
        var pagesToScan = new Option<int>("--pages-to-scan") { Description = "ksmd's pages_to_scan (0: a fortieth of all buffers, a full scan in about a second)", DefaultValueFactory = _ => 0 };
        var sleep = new Option<int>("--sleep-millisecs") { Description = "ksmd's sleep_millisecs between batches", DefaultValueFactory = _ => 20 };
        var timeout = new Option<int>("--timeout-seconds") { Description = "how long each KSM phase waits to converge", DefaultValueFactory = _ => 15 };

        var root = new RootCommand("Vmm: an in-process virtual memory manager over real unmanaged memory. With no command: the KSM demo, then the fork demo.")
        {
            Nodes, NodeSize, BlockSize, Touch, processes, bufferMib, useZeroPages, pagesToScan, sleep, timeout,
        };
        root.SetAction(parse => Guard(() =>
        {
            MachineOptions machine = MachineOptionsOf(parse);
            var demo = new KsmDemoOptions(parse.GetValue(processes), parse.GetValue(bufferMib), parse.GetValue(useZeroPages),
                parse.GetValue(pagesToScan), parse.GetValue(sleep), parse.GetValue(timeout));
            int exitCode = KsmDemo.Run(machine, demo, AnsiConsole.Console);
            long touch = (long)parse.GetValue(Touch) << 20;
            if (exitCode == 0 && touch > 0)
                exitCode = MachineView.Run(machine, touch, AnsiConsole.Console, showTables: false);
            return exitCode;
        }));
        root.Subcommands.Add(BuildMachineCommand());
        root.Subcommands.Add(DedupeCommand.Build(Guard));
        return root;
    }

    private static Command BuildMachineCommand()
    {
        var command = new Command("machine", "Show the machine: nodes, zones, memory blocks, buddyinfo; then processes that fork and copy on write.")
        {
            Nodes, NodeSize, BlockSize, Touch,
        };
        command.SetAction(parse => Guard(() =>
            MachineView.Run(MachineOptionsOf(parse), (long)parse.GetValue(Touch) << 20, AnsiConsole.Console, showTables: true)));
        return command;
    }

    /// <summary>The machine's shape from the options (the root and `machine` share them).</summary>
    private static MachineOptions MachineOptionsOf(ParseResult parse) => new()
    {
        NodeCount = parse.GetValue(Nodes),
        NodeSizeBytes = (long)parse.GetValue(NodeSize) << 20,
        BlockSizeBytes = (long)parse.GetValue(BlockSize) << 20,
    };

    /// <summary>Runs a command; an ArgumentException (a bad option value) prints its message and exits 2.</summary>
    private static int Guard(Func<int> run)
    {
        try
        {
            return run();
        }
        catch (ArgumentException e)
        {
            AnsiConsole.MarkupLineInterpolated($"[red]error:[/] {e.Message}");
            return BadArguments;
        }
    }
}
