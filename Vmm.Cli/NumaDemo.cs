// NumaDemo: `vmm numa`, page placement and page migration on a two-node machine, through the public
// API only, as a host would use it (what numactl, migratepages and a cpuset's memory_migrate do on Linux).
//
// The story:
//   1. Five processes each write a buffer, placed by their memory policy (set_mempolicy): default and
//      local (their home node, 0), interleave over both nodes, bind to node 1, weighted interleave 3:1.
//      A table like `numastat -p` shows each process's MiB per node; a second one the nodes' free memory
//      and LRU lists (nr_inactive_anon, nr_active_anon, nr_isolated_anon); then the migration counters
//      (pgmigrate_success, pgmigrate_fail, per reason).
//   2. Pages move while the processes keep their data, the tables after each step:
//      mbind(MPOL_BIND, MPOL_MF_MOVE) of half a buffer; move_pages of some pages; migrate_pages(pid, 0 -> 1);
//      a cpuset with memory_migrate whose mems shrink to node 1.
//   3. Every page is read back (each holds its process and page number) and the machine audits itself.
//      A wrong byte or an Audit problem makes the exit code 1.
using Spectre.Console;

namespace Vmm.Cli;

/// <summary>The options of `vmm numa`.</summary>
/// <param name="ProcessMib">MiB each process writes.</param>
internal sealed record NumaDemoOptions(int ProcessMib)
{
    /// <summary>The processes of the demo: their buffers must fit on one node with room for the moves.</summary>
    public const int Processes = 5;

    /// <summary>Checks the options against the machine; throws UsageException (exit code 2).</summary>
    public void Validate(MachineOptions machine)
    {
        if (ProcessMib < 1)
            throw new UsageException($"--process-mib must be at least 1 (got {ProcessMib})");
        // Every buffer may end up on node 1 (bind, then the moves): all of them must fit in half a node.
        long wanted = (long)Processes * ProcessMib * Units.MiB;
        if (wanted > machine.NodeSizeBytes / 2)
            throw new UsageException(
                $"{Processes} buffers of {ProcessMib} MiB must fit in half a node ({machine.NodeSizeBytes / Units.MiB / 2} MiB): lower --process-mib or raise --node-size-mib");
    }
}

/// <summary>Runs the NUMA demo on a fresh two-node machine.</summary>
internal sealed partial class NumaDemo
{
    /// <summary>One process of the demo: its label, the policy it was placed by, and its buffer.</summary>
    private sealed record Placed(string Label, VmProcess Process, ulong Address, int Pages);

    private readonly Machine _machine;
    private readonly IAnsiConsole _console;
    private readonly NumaDemoOptions _options;
    private readonly List<Placed> _placed = [];
    private MigrationStats _lastStats;
    private bool _shown;
    private readonly List<string> _problems = [];

    private NumaDemo(Machine machine, NumaDemoOptions options, IAnsiConsole console)
    {
        _machine = machine;
        _options = options;
        _console = console;
        _lastStats = machine.GetMigrationStats();
    }

    /// <summary>Builds the machine (two nodes), runs the demo and returns the exit code (1: a wrong byte or an Audit problem).</summary>
    public static int Run(MachineOptions machineOptions, NumaDemoOptions options, IAnsiConsole console)
    {
        options.Validate(machineOptions);
        using Machine machine = Usage.CreateMachine(machineOptions);
        return new NumaDemo(machine, options, console).Run();
    }

    private int Run()
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Place();
        Show("Placed by policy");

        MbindMove();
        MovePages();
        MigratePages();
        CpusetMove();

        CheckContents();
        IReadOnlyList<string> audit = _machine.Audit();
        _problems.AddRange(audit);
        _console.Write(new Rule("Audit").LeftJustified());
        string contents = _problems.Count == audit.Count ? "[green]yes[/]" : "[red]no[/]";
        string verdict = audit.Count == 0 ? "[green]clean[/]" : $"[red]{audit.Count} problems[/]";
        _console.MarkupLine(
            $"Every page read back with its process's data: {contents}. Audit (every list, counter, mapcount and refcount recounted): {verdict}.");
        foreach (string problem in _problems.Take(10))
            _console.MarkupLineInterpolated($"  [red]{problem}[/]");
        _console.MarkupLineInterpolated($"[grey]NUMA demo: {clock.Elapsed.TotalSeconds:F1} s[/]");
        return _problems.Count == 0 ? ExitCodes.Success : ExitCodes.AuditProblem;
    }

    // ---- placement ---------------------------------------------------------------------------------

    private void Place()
    {
        Topology topology = _machine.Topology;
        _console.Write(new Rule("[bold]Vmm: NUMA placement and page migration[/]").LeftJustified());
        _console.MarkupLineInterpolated(
            $"A machine of {topology.NodeCount} nodes x {topology.FramesPerNode * Topology.PageSize / Units.MiB} MiB; {NumaDemoOptions.Processes} processes (home node 0) each write {_options.ProcessMib} MiB, placed by their memory policy (set_mempolicy):");

        NodeMask both = NodeMask.Of(0, 1);
        Check(_machine.SetInterleaveWeight(0, 3), "weighted_interleave/node0 = 3");
        Check(_machine.SetInterleaveWeight(1, 1), "weighted_interleave/node1 = 1");
        Add("default", p => Errno.None);
        Add("local", p => p.SetMempolicy(MempolicyMode.Local, NodeMask.Empty));
        Add("interleave", p => p.SetMempolicy(MempolicyMode.Interleave, both));
        Add("bind", p => p.SetMempolicy(MempolicyMode.Bind, NodeMask.Of(1)));
        Add("weighted", p => p.SetMempolicy(MempolicyMode.WeightedInterleave, both));

        var table = new Table().AddColumns("process", "policy", "where its pages should go");
        table.AddRow(Name(0), "MPOL_DEFAULT", "the local node: its home node, 0");
        table.AddRow(Name(1), "MPOL_LOCAL", "the local node, 0");
        table.AddRow(Name(2), "MPOL_INTERLEAVE 0-1", "alternate pages on node 0 and node 1, by page offset");
        table.AddRow(Name(3), "MPOL_BIND 1", "node 1 only (no fallback)");
        table.AddRow(Name(4), "MPOL_WEIGHTED_INTERLEAVE 0-1", "3 pages on node 0 for each on node 1 (weights 3:1)");
        _console.Write(table);
    }

    /// <summary>A process: sets its policy, then maps and writes its buffer (every page faults where the policy says).</summary>
    private void Add(string label, Func<VmProcess, Errno> setPolicy)
    {
        VmProcess process = _machine.CreateProcess(homeNode: 0);
        Check(setPolicy(process), $"{label}: set_mempolicy");
        int pages = (int)((long)_options.ProcessMib * Units.MiB / Topology.PageSize);
        ulong va = process.Mmap((ulong)pages * Topology.PageSize);
        for (int p = 0; p < pages; p++)
            process.Write(va + (ulong)p * Topology.PageSize, Stamp(process, p));
        _placed.Add(new Placed(label, process, va, pages));
    }

    /// <summary>What page <paramref name="page"/> of a process holds: its pid and the page's number.</summary>
    private static long Stamp(VmProcess process, int page) => ((long)process.Pid << 32) | (uint)page;

    private string Name(int i) => $"P{i + 1} {_placed[i].Label}";

    // ---- the moves ---------------------------------------------------------------------------------

    /// <summary>mbind(MPOL_BIND {1}, MPOL_MF_MOVE | MPOL_MF_STRICT) over the first half of P1's buffer.</summary>
    private void MbindMove()
    {
        Placed p1 = _placed[0];
        ulong half = (ulong)(p1.Pages / 2) * Topology.PageSize;
        Errno error = p1.Process.Mbind(p1.Address, half, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None,
            MovePolicyFlags.Move | MovePolicyFlags.Strict);
        Check(error, "mbind");
        Check(p1.Process.GetMempolicy(out int mode, out NodeMask nodes, p1.Address, GetMempolicyFlags.Address), "get_mempolicy(MPOL_F_ADDR)");
        Show($"mbind(MPOL_BIND 1, MPOL_MF_MOVE | MPOL_MF_STRICT) of the first half of {Name(0)}'s buffer: {error}",
            $"The range's policy is now {ModeName((MempolicyMode)mode)} {nodes} (get_mempolicy MPOL_F_ADDR); its pages moved to node 1 (reason mempolicy_mbind); the rest of the buffer kept the process policy.");
    }

    // ---- showing -----------------------------------------------------------------------------------

    /// <summary>The tables after a step: per process and node (numastat -p), per node (free, LRU), and the counters.</summary>
    private void Show(string title, string? comment = null)
    {
        _console.Write(new Rule(Markup.Escape(title)).LeftJustified());
        if (comment is not null)
            _console.MarkupLineInterpolated($"{comment}");

        var table = new Table().AddColumns("Per-node process memory usage (MiB)", "policy", "Node 0", "Node 1", "Total");
        for (int c = 2; c < 5; c++)
            table.Columns[c].RightAligned();
        var sums = new long[2];
        for (int i = 0; i < _placed.Count; i++)
        {
            long[] perNode = PagesPerNode(_placed[i]);
            sums[0] += perNode[0];
            sums[1] += perNode[1];
            table.AddRow($"{_placed[i].Process.Pid} ({Name(i)})", Policy(_placed[i].Process), Mib(perNode[0]), Mib(perNode[1]), Mib(perNode[0] + perNode[1]));
        }
        table.AddRow("Total", "", Mib(sums[0]), Mib(sums[1]), Mib(sums[0] + sums[1]));
        _console.Write(table);

        MachineStats stats = _machine.GetStats();
        var nodes = new Table().AddColumns("node", "MemFree", "nr_inactive_anon", "nr_active_anon", "nr_isolated_anon");
        for (int c = 1; c < 5; c++)
            nodes.Columns[c].RightAligned();
        foreach (NodeStats node in stats.Nodes)
        {
            nodes.AddRow($"Node {node.Node}", Units.Mib(node.MemFreeBytes), node.InactiveAnonPages.ToString("N0"),
                node.ActiveAnonPages.ToString("N0"), node.IsolatedAnonPages.ToString("N0"));
        }
        _console.Write(nodes);
        if (!_shown)
            _console.MarkupLine("[grey](A new page reaches its LRU list when its CPU's add batch of up to 31 pages is drained: the lists may trail the processes by a few pages.)[/]");

        MigrationStats now = _machine.GetMigrationStats();
        long success = VmStat("pgmigrate_success"), fail = VmStat("pgmigrate_fail");
        string reasons = string.Join(", ", now.SucceededByReason.Where(r => r.Value > 0)
            .Select(r => $"{ReasonName(r.Key)} {r.Value:N0}"));
        _console.MarkupLineInterpolated(
            $"pgmigrate_success [green]{success:N0}[/] (+{now.Succeeded - _lastStats.Succeeded:N0})  pgmigrate_fail {fail:N0} (+{now.Failed - _lastStats.Failed:N0})  by reason: {(reasons.Length == 0 ? "none yet" : reasons)}");
        _lastStats = now;
        _shown = true;
    }

    /// <summary>Pages of the process's buffer on each node (the per-page walk numastat -p reads from numa_maps).</summary>
    private static long[] PagesPerNode(Placed placed)
    {
        var counts = new long[2];
        for (int p = 0; p < placed.Pages; p++)
        {
            PagemapEntry entry = placed.Process.GetPagemap(placed.Address + (ulong)p * Topology.PageSize);
            if (entry.Present && !entry.ZeroPage)
                counts[entry.Node]++;
        }
        return counts;
    }

    /// <summary>The process policy as get_mempolicy reports it.</summary>
    private static string Policy(VmProcess process)
    {
        Check(process.GetMempolicy(out int mode, out NodeMask nodes), "get_mempolicy");
        return nodes.IsEmpty ? ModeName((MempolicyMode)mode) : $"{ModeName((MempolicyMode)mode)} {nodes}";
    }

    /// <summary>Linux's name of a policy mode (include/uapi/linux/mempolicy.h).</summary>
    private static string ModeName(MempolicyMode mode) => mode switch
    {
        MempolicyMode.Default => "MPOL_DEFAULT",
        MempolicyMode.Preferred => "MPOL_PREFERRED",
        MempolicyMode.Bind => "MPOL_BIND",
        MempolicyMode.Interleave => "MPOL_INTERLEAVE",
        MempolicyMode.Local => "MPOL_LOCAL",
        MempolicyMode.PreferredMany => "MPOL_PREFERRED_MANY",
        MempolicyMode.WeightedInterleave => "MPOL_WEIGHTED_INTERLEAVE",
        _ => mode.ToString(),
    };

    private long VmStat(string name)
    {
        Check(_machine.ReadVmStat(name, out long value), $"reading {name}");
        return value;
    }

    /// <summary>The /proc/vmstat spelling of a reason (pgmigrate_success per reason is Linux's migrate_reason_names).</summary>
    private static string ReasonName(MigrateReason reason) => reason switch
    {
        MigrateReason.Compaction => "compaction",
        MigrateReason.MemoryFailure => "memory_failure",
        MigrateReason.MemoryHotplug => "memory_hotplug",
        MigrateReason.Syscall => "syscall_or_cpuset",
        MigrateReason.MempolicyMbind => "mempolicy_mbind",
        MigrateReason.NumaMisplaced => "numa_misplaced",
        MigrateReason.ContigRange => "contig_range",
        MigrateReason.LongtermPin => "longterm_pin",
        MigrateReason.Demotion => "demotion",
        _ => reason.ToString(),
    };

    private static string Mib(long pages) => $"{pages * Topology.PageSize / (double)Units.MiB:N1}";

    /// <summary>A call the demo needs: any error is a bug of Vmm (exit 3 through the guard).</summary>
    private static void Check(Errno error, string what)
    {
        if (error != Errno.None)
            throw new InvalidOperationException($"{what} failed: {error}");
    }

    // ---- the end -----------------------------------------------------------------------------------

    /// <summary>Every page of every buffer still holds its stamp, wherever it moved.</summary>
    private void CheckContents()
    {
        foreach (Placed placed in _placed)
        {
            for (int p = 0; p < placed.Pages; p++)
            {
                long value = placed.Process.Read<long>(placed.Address + (ulong)p * Topology.PageSize);
                if (value != Stamp(placed.Process, p))
                {
                    _problems.Add($"{placed.Label} pid {placed.Process.Pid} page {p}: read {value:X}, wrote {Stamp(placed.Process, p):X}");
                    break;
                }
            }
        }
    }
}
