// NumaDemo, the moves a user asks for by call: move_pages, migrate_pages(pid) and a cpuset whose mems
// change with memory_migrate on (the rest of the demo is in NumaDemo.cs).
using Spectre.Console;

namespace Vmm.Cli;

internal sealed partial class NumaDemo
{
    /// <summary>An address no mapping covers: move_pages reports -EFAULT for it.</summary>
    private const ulong Unmapped = 0x1000;

    /// <summary>
    /// move_pages: P3 (interleaved) gathers the first half of its buffer on node 0. A report first
    /// (nodes null) says where each page is; the move's statuses say where each page is after it, plus
    /// one address nothing maps, whose status is -EFAULT.
    /// </summary>
    private void MovePages()
    {
        Placed p3 = _placed[2];
        int count = p3.Pages / 2;
        var pages = new ulong[count + 1];
        for (int i = 0; i < count; i++)
            pages[i] = p3.Address + (ulong)i * Topology.PageSize;
        pages[count] = Unmapped;
        var status = new int[pages.Length];
        Check(p3.Process.MovePages(0, pages, null, status), "move_pages (report)");
        int onNode1 = status.Count(s => s == 1);

        var nodes = new int[pages.Length]; // all 0
        Errno error = p3.Process.MovePages(0, pages, nodes, status);
        Check(error, "move_pages");
        string statuses = string.Join(", ", status.GroupBy(s => s).OrderBy(g => g.Key)
            .Select(g => $"{StatusName(g.Key)} x {g.Count():N0}"));
        Show($"move_pages(0, {pages.Length:N0} pages, all to node 0) by {Name(2)}: {error}",
            $"The report before (nodes = NULL) found {onNode1:N0} of them on node 1. Statuses after the move: {statuses}.");
    }

    /// <summary>A move_pages status: a node, or a negative errno by name.</summary>
    private static string StatusName(int status) => status >= 0 ? $"node {status}" : $"-{(Errno)(-status)}";

    /// <summary>migrate_pages(P2's pid, {0}, {1}) called by P1, as the migratepages tool does.</summary>
    private void MigratePages()
    {
        Placed p1 = _placed[0], p2 = _placed[1];
        Errno error = p1.Process.MigratePages(p2.Process.Pid, NodeMask.Of(0), NodeMask.Of(1), out long notMoved);
        Check(error, "migrate_pages");
        Show($"migrate_pages({p2.Process.Pid}, 0, 1) by {Name(0)} (migratepages {p2.Process.Pid} 0 1): {error}",
            $"Every page of {Name(1)} on node 0 moved to node 1; pages not moved: {notMoved:N0}. Its policy (MPOL_LOCAL) is unchanged: new pages still fault on node 0.");
    }

    /// <summary>
    /// A cpuset "jobs" (mems 0-1, memory_migrate on) takes P5; its mems are then written to 1 alone: P5's
    /// weighted-interleave policy is rebound to node 1 and its pages on node 0 follow (cpuset_migrate_mm).
    /// </summary>
    private void CpusetMove()
    {
        Placed p5 = _placed[4];
        Cpuset jobs = _machine.CreateCpuset("jobs", NodeMask.Of(0, 1));
        jobs.MemoryMigrate = true;
        Check(jobs.Attach(p5.Process), "attaching to the cpuset");
        long before = PagesPerNode(p5)[0];
        Errno error = jobs.SetMems(NodeMask.Of(1));
        Check(error, "writing cpuset.mems");
        long after = PagesPerNode(p5)[0];
        Check(p5.Process.GetMempolicy(out _, out NodeMask allowed, 0, GetMempolicyFlags.MemsAllowed), "get_mempolicy(MPOL_F_MEMS_ALLOWED)");
        Show($"cpuset jobs (memory_migrate = 1) holding {Name(4)}: cpuset.mems 0-1 -> 1: {error}",
            $"Its pages on node 0: {Mib(before)} MiB before, {Mib(after)} MiB after; its policy is rebound to node 1, and get_mempolicy(MPOL_F_MEMS_ALLOWED) says {allowed}.");
        if (after != 0)
            _problems.Add($"{Name(4)}: {after:N0} pages still on node 0 after its cpuset's mems became 1 with memory_migrate on");
    }
}
