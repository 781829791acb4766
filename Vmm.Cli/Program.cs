// vmm: the command-line face of Vmm.
//
//   vmm                  the demo, on built-in defaults (2 NUMA nodes x 512 MiB in 128 MiB blocks):
//                        KSM merging duplicate-rich buffers of several processes with a live view, then
//                        writes that break sharing (KsmDemo); then, briefly, fork and copy-on-write
//                        (MachineView). Each part ends with an Audit; a problem makes the exit code 1.
//   vmm dedupe PATH...   loads real files into mergeable memory and reports what KSM saves (DedupeCommand).
//   vmm machine          the machine's tables (nodes, zones, memory blocks, buddyinfo) and the fork demo.
//   vmm numa             two nodes: processes placed by memory policy, then pages moved by mbind, move_pages,
//                        migrate_pages and a cpuset's memory_migrate, shown like numastat -p (NumaDemo).
//   vmm hotplug          two nodes busy with writers and KSM: a movable memory block taken offline with a
//                        progress bar, a pinned page that stops an offline, the block onlined again (HotplugDemo).
//   vmm balloon          the memory balloon: inflate (RSS falls), an offline that migrates balloon pages,
//                        deflate, Audit (BalloonDemo).
//
// Exit codes (ExitCodes, listed by every --help): 0 success, 1 an audit found a problem, 2 bad
// arguments, 3 internal error. Parsing is strict: an unknown option is an error, not a path (`--` ends
// the options, for a path that starts with '-'); every number has a range that the parser checks, so a
// bad value is refused with the option's name before any machine is built. An unexpected exception is
// printed and exits 3, never 1, so that it cannot be mistaken for an Audit verdict.
using System.CommandLine;
using System.CommandLine.Parsing;
using Spectre.Console;

namespace Vmm.Cli;

internal static class Program
{
    private static int Main(string[] args) => Run(args, CreateConsole(), Console.Out, Console.Error);

    /// <summary>
    /// Parses and runs one command line, drawing on <paramref name="console"/>; help goes to
    /// <paramref name="output"/>, the stack trace of an internal error to <paramref name="error"/>.
    /// Returns the exit code (<see cref="ExitCodes"/>). Tests call this in-process.
    /// </summary>
    internal static int Run(string[] args, IAnsiConsole console, TextWriter output, TextWriter error)
    {
        try
        {
            RootCommand root = BuildRoot(console, error);
            ParseResult parse = root.Parse(args);
            List<string> problems = [.. parse.Errors.Select(e => e.Message), .. UnknownOptions(parse).Select(o => $"unknown option {o} (use -- before a path that starts with '-')")];
            if (problems.Count > 0 && parse.Action is not Usage.HelpWithExitCodes) // --help wins, as in System.CommandLine
            {
                foreach (string problem in problems)
                    console.MarkupLineInterpolated($"[red]error:[/] {problem}");
                console.MarkupLine("Run [bold]vmm --help[/] for the options.");
                return ExitCodes.BadArguments;
            }
            // Our own handler (Guard) maps exceptions to exit codes; System.CommandLine's would say 1.
            return parse.Invoke(new InvocationConfiguration { Output = output, Error = error, EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            return InternalError(console, error, e);
        }
    }

    /// <summary>
    /// Tokens that look like options ("-x", "--bogus") but were taken as a command's arguments because
    /// no option has that name; after "--" everything is an argument.
    /// </summary>
    private static IEnumerable<string> UnknownOptions(ParseResult parse)
    {
        var argumentTokens = new HashSet<Token>(
            parse.CommandResult.Children.OfType<ArgumentResult>().SelectMany(a => a.Tokens),
            ReferenceEqualityComparer.Instance);
        foreach (Token token in parse.Tokens)
        {
            if (token.Type == TokenType.DoubleDash)
                yield break;
            if (token.Value.Length > 1 && token.Value[0] == '-' && argumentTokens.Contains(token))
                yield return token.Value;
        }
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

    private static RootCommand BuildRoot(IAnsiConsole console, TextWriter error)
    {
        // The machine's shape, shared by the root and `machine`.
        Option<int> nodes = Usage.IntOption("--nodes", "NUMA nodes", 2, 1, 64);
        Option<int> nodeSize = Usage.IntOption("--node-size-mib", "MiB per node, a multiple of --block-size-mib", 512, 2, 1 << 24);
        Option<int> blockSize = Usage.BlockSizeOption("MiB per memory block (hotplug unit)");
        Option<int> touch = Usage.IntOption("--touch-mib", "MiB the fork demo's first process writes (0: skip the fork demo)", 32, 0, 1 << 20);

        Option<int> processes = Usage.IntOption("--processes", "processes in the KSM demo, each with one buffer", 4, 2, 64);
        Option<int> bufferMib = Usage.IntOption("--buffer-mib", "MiB per process buffer in the KSM demo", 32, 1, 1 << 20);
        var useZeroPages = new Option<bool>("--use-zero-pages") { Description = "KSM's use_zero_pages: zero pages become the zero page" };
        Option<int> pagesToScan = Usage.IntOption("--pages-to-scan", "ksmd's pages_to_scan (0: a fortieth of all buffers, a full scan in about a second)", 0, 0, int.MaxValue);
        Option<int> sleep = Usage.IntOption("--sleep-millisecs", "ksmd's sleep_millisecs between batches", 20, 0, 60_000);
        Option<int> timeout = Usage.IntOption("--timeout-seconds", "how long each KSM phase waits to converge", 15, 1, 86_400);

        MachineOptions MachineOptionsOf(ParseResult parse) => ShapeOf(parse, parse.GetValue(nodes));

        MachineOptions ShapeOf(ParseResult parse, int count)
        {
            int node = parse.GetValue(nodeSize), block = parse.GetValue(blockSize);
            if (node % block != 0)
                throw new UsageException($"--node-size-mib ({node}) must be a multiple of --block-size-mib ({block})");
            if ((long)count * node > 1L << 24)
                throw new UsageException($"--nodes x --node-size-mib must be at most {1 << 24} MiB (16 TiB: pfns are 32-bit); got {(long)count * node}");
            return new MachineOptions { NodeCount = count, NodeSizeBytes = (long)node << 20, BlockSizeBytes = (long)block << 20 };
        }

        var root = new RootCommand("Vmm: an in-process virtual memory manager over real unmanaged memory. With no command: the KSM demo, then the fork demo.")
        {
            nodes, nodeSize, blockSize, touch, processes, bufferMib, useZeroPages, pagesToScan, sleep, timeout,
        };
        root.SetAction(parse => Guard(console, error, () =>
        {
            MachineOptions machine = MachineOptionsOf(parse);
            var demo = new KsmDemoOptions(parse.GetValue(processes), parse.GetValue(bufferMib), parse.GetValue(useZeroPages),
                parse.GetValue(pagesToScan), parse.GetValue(sleep), parse.GetValue(timeout));
            int exitCode = KsmDemo.Run(machine, demo, console);
            long touchBytes = (long)parse.GetValue(touch) << 20;
            if (exitCode == ExitCodes.Success && touchBytes > 0)
                exitCode = MachineView.Run(machine, touchBytes, console, showTables: false);
            return exitCode;
        }));

        var machineCommand = new Command("machine", "Show the machine: nodes, zones, memory blocks, buddyinfo; then processes that fork and copy on write.")
        {
            nodes, nodeSize, blockSize, touch,
        };
        machineCommand.SetAction(parse => Guard(console, error, () =>
            MachineView.Run(MachineOptionsOf(parse), (long)parse.GetValue(touch) << 20, console, showTables: true)));
        root.Subcommands.Add(machineCommand);

        Option<int> processMib = Usage.IntOption("--process-mib", "MiB each of the five processes writes (all five must fit in half a node)", 16, 1, 1 << 20);
        var numaCommand = new Command("numa", "Two NUMA nodes: processes placed by memory policy, then pages moved by mbind, move_pages, migrate_pages and a cpuset's memory_migrate, shown per process and node like numastat -p, with the LRU lists and the migration counters.")
        {
            nodeSize, blockSize, processMib,
        };
        numaCommand.SetAction(parse => Guard(console, error, () =>
            NumaDemo.Run(ShapeOf(parse, 2), new NumaDemoOptions(parse.GetValue(processMib)), console)));
        root.Subcommands.Add(numaCommand);

        Option<int> hotplugProcesses = Usage.IntOption("--processes", "processes, each with a writer thread (all their buffers must fit in half a node)", 4, 2, 16);
        Option<int> hotplugProcessMib = Usage.IntOption("--process-mib", "MiB of each process's buffer: half merged by KSM, half rewritten by its writer", 8, 1, 1 << 20);
        Option<int> maxPasses = Usage.IntOption("--max-passes", "offline_migrate_max_passes for the offline that a pinned page must stop", 3, 1, 1000);
        Option<int> hotplugTimeout = Usage.IntOption("--timeout-seconds", "how long KSM may take to merge, and an offline to finish", 15, 1, 86_400);
        var hotplugCommand = new Command("hotplug", "Memory hot-remove on two NUMA nodes busy with writers and KSM: the zones and memory blocks, a ZONE_MOVABLE block taken offline with a progress bar, a pinned page that keeps another block online (the dry run and the offline say why), and the block onlined again; every byte the writers wrote is checked.")
        {
            nodeSize, blockSize, hotplugProcesses, hotplugProcessMib, maxPasses, hotplugTimeout,
        };
        hotplugCommand.SetAction(parse => Guard(console, error, () =>
            HotplugDemo.Run(ShapeOf(parse, 2), new HotplugDemoOptions(parse.GetValue(hotplugProcesses), parse.GetValue(hotplugProcessMib),
                parse.GetValue(maxPasses), parse.GetValue(hotplugTimeout)), console)));
        root.Subcommands.Add(hotplugCommand);

        Option<int> balloonProcessMib = Usage.IntOption("--process-mib", "MiB a process writes and frees first (resident until the balloon takes it)", 64, 1, 1 << 20);
        Option<int> inflateMib = Usage.IntOption("--inflate-mib", "MiB the balloon inflates by (at most a node)", 160, 1, 1 << 20);
        var balloonCommand = new Command("balloon", "The memory balloon (virtio-balloon) on two NUMA nodes: inflate (the host's RSS falls), the zones and the balloon counters, a ZONE_MOVABLE block holding balloon pages taken offline (they migrate: movable_operations), deflate, Audit.")
        {
            nodeSize, blockSize, balloonProcessMib, inflateMib,
        };
        balloonCommand.SetAction(parse => Guard(console, error, () =>
            BalloonDemo.Run(ShapeOf(parse, 2), new BalloonDemoOptions(parse.GetValue(balloonProcessMib), parse.GetValue(inflateMib)), console)));
        root.Subcommands.Add(balloonCommand);
        root.Subcommands.Add(DedupeCommand.Build(run => Guard(console, error, run), console));
        Usage.AddExitCodesToHelp(root);
        return root;
    }

    /// <summary>
    /// Runs a command: a <see cref="UsageException"/> (bad arguments found after parsing) prints its
    /// message and exits 2; any other exception is an internal error (exit 3).
    /// </summary>
    internal static int Guard(IAnsiConsole console, TextWriter error, Func<int> run)
    {
        try
        {
            return run();
        }
        catch (UsageException e)
        {
            console.MarkupLineInterpolated($"[red]error:[/] {e.Message}");
            return ExitCodes.BadArguments;
        }
        catch (Exception e)
        {
            return InternalError(console, error, e);
        }
    }

    private static int InternalError(IAnsiConsole console, TextWriter error, Exception e)
    {
        console.MarkupLineInterpolated($"[red]internal error[/] (a bug in vmm or Vmm; exit code {ExitCodes.InternalError}): {e.GetType().Name}: {e.Message}");
        error.WriteLine(e);
        return ExitCodes.InternalError;
    }
}
