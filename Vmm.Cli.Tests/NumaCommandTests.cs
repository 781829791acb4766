namespace Vmm.Cli.Tests;

/// <summary>`vmm numa`: the two-node placement and migration demo runs clean and shows what it promises.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class NumaCommandTests
{
    private static VmmResult _run = null!;

    [OneTimeSetUp]
    public void RunOnce() => _run = VmmRun.Run(["numa", "--process-mib", "4"]);

    [Test]
    public void The_numa_command_runs_and_exits_0_with_a_clean_audit()
    {
        Assert.That(_run.ExitCode, Is.EqualTo(0), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Audit (every list, counter, mapcount and refcount recounted): clean"), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Every page read back with its process's data: yes"), _run.ToString());
    }

    [Test]
    public void Its_output_names_both_nodes_the_lru_counts_and_the_migration_counters()
    {
        foreach (string word in new[] { "Node 0", "Node 1", "nr_inactive_anon", "nr_active_anon", "nr_isolated_anon", "pgmigrate_success", "pgmigrate_fail" })
            Assert.That(_run.Output, Does.Contain(word), _run.ToString());
    }

    [Test]
    public void Each_policy_places_its_process_as_numastat_shows()
    {
        // 4 MiB per process: default and local all on node 0, interleave half and half, bind all on
        // node 1, weighted interleave 3:1 (rows: pid (label) | policy | node 0 | node 1 | total).
        Assert.That(_run.Output, Does.Match(@"\(P2 local\)\s*│[^│]*│\s*4\.0\s*│\s*0\.0\s*│\s*4\.0"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"\(P3 interleave\)\s*│[^│]*│\s*2\.0\s*│\s*2\.0\s*│\s*4\.0"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"\(P4 bind\)\s*│[^│]*│\s*0\.0\s*│\s*4\.0\s*│\s*4\.0"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"\(P5 weighted\)\s*│[^│]*│\s*3\.0\s*│\s*1\.0\s*│\s*4\.0"), _run.ToString());
    }

    [Test]
    public void Mbind_move_shows_half_of_the_first_process_on_node_1_and_the_counter_rises()
    {
        Assert.That(_run.Output, Does.Match(@"\(P1 default\)\s*│[^│]*│\s*2\.0\s*│\s*2\.0\s*│\s*4\.0"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"pgmigrate_success 512 \(\+512\)"), $"2 MiB = 512 pages moved by mbind; {_run}");
        Assert.That(_run.Output, Does.Contain("mempolicy_mbind 512"), _run.ToString());
    }

    [Test]
    public void Move_pages_reports_each_page_and_an_unmapped_address_as_efault()
    {
        // P3's first half: 512 pages, 256 of them on node 1 (interleave), all moved to node 0.
        Assert.That(_run.Output, Does.Contain("found 256 of them on node 1"), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Statuses after the move: -EFAULT x 1, node 0 x 512."), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"\(P3 interleave\)\s*│[^│]*│\s*3\.0\s*│\s*1\.0\s*│\s*4\.0"), _run.ToString());
    }

    [Test]
    public void Migrate_pages_moves_the_second_process_to_node_1_and_the_cpuset_moves_the_fifth()
    {
        Assert.That(_run.Output, Does.Match(@"\(P2 local\)\s*│[^│]*│\s*0\.0\s*│\s*4\.0\s*│\s*4\.0"), _run.ToString());
        Assert.That(_run.Output, Does.Contain("pages not moved: 0"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"\(P5 weighted\)\s*│\s*MPOL_WEIGHTED_INTERLEAVE 1\s*│\s*0\.0\s*│\s*4\.0\s*│\s*4\.0"), _run.ToString());
        // move_pages 256 + migrate_pages 1,024 + the cpuset's 768 pages, all reason MR_SYSCALL.
        Assert.That(_run.Output, Does.Contain("by reason: syscall_or_cpuset 2,048, mempolicy_mbind 512"), _run.ToString());
    }

    [TestCase("--process-mib", "0")]
    [TestCase("--process-mib", "many")]
    [TestCase("--node-size-mib", "-1")]
    [TestCase("--bogus", "1")]
    [TestCase("--nodes", "3")]
    public void A_bad_option_exits_2_naming_it(string option, string value)
    {
        VmmResult result = VmmRun.Run(["numa", option, value]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain(option), result.ToString());
    }

    [Test]
    public void Buffers_that_do_not_fit_in_half_a_node_exit_2_before_any_machine_is_built()
    {
        VmmResult result = VmmRun.Run(["numa", "--node-size-mib", "64", "--block-size-mib", "2", "--process-mib", "7"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("must fit in half a node (32 MiB)"), result.ToString());
    }
}
