namespace Vmm.Cli.Tests;

/// <summary>`vmm hotplug`: the hot-remove demo runs clean, shows what it promises, and refuses bad options.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class HotplugCommandTests
{
    /// <summary>
    /// A small machine: 2 nodes x 64 MiB in 16 MiB blocks (two ZONE_MOVABLE blocks per node). Merging takes
    /// a fraction of a second; the generous timeout keeps a loaded CI machine from cutting it short.
    /// </summary>
    private static readonly string[] Small = ["hotplug", "--node-size-mib", "64", "--block-size-mib", "16", "--processes", "2", "--process-mib", "4", "--timeout-seconds", "30"];

    private static VmmResult _run = null!;

    [OneTimeSetUp]
    public void RunOnce() => _run = VmmRun.Run(Small);

    [Test]
    public void The_hotplug_command_runs_and_exits_0_with_every_byte_intact_and_a_clean_audit()
    {
        Assert.That(_run.ExitCode, Is.EqualTo(0), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Every byte the writers wrote read back: yes"), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Audit (every list, counter, mapcount and refcount recounted): clean"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"The writers wrote [1-9][\d,]* times in all"), $"the writers ran; {_run}");
    }

    [Test]
    public void Its_tables_show_each_zones_memory_and_each_blocks_state_and_valid_zones()
    {
        foreach (string word in new[] { "managed MiB", "free MiB", "valid_zones", "state", "KSM pages", "Node 0", "Node 1" })
            Assert.That(_run.Output, Does.Contain(word), _run.ToString());
        // Before the offline, node 0's movable zone is 32 MiB; while its block is offline, 16 MiB.
        Assert.That(_run.Output, Does.Match(@"Node 0\s*│\s*Movable\s*│\s*32\.0\s*│"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"Node 0\s*│\s*Movable\s*│\s*16\.0\s*│"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"memory\d+ \*\s*│\s*0\s*│\s*-\s*│\s*offline\s*│\s*Movable"), $"the offline block in the list; {_run}");
    }

    [Test]
    public void A_movable_block_goes_offline_with_a_progress_bar_and_ksm_keeps_its_sharing()
    {
        Assert.That(_run.Output, Does.Match(@"memory\d+ is offline: [1-9][\d,]* pages moved in \d+ pass"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"memory\d+\s+100%"), $"the progress ends at 100%; {_run}");
        Assert.That(_run.Output, Does.Contain("KSM counters kept: yes"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"pages_sharing 512 of 512 after [\d.]+ s: merged"), $"two processes' 512 identical pages merged; {_run}");
    }

    [Test]
    public void Redirected_output_has_no_carriage_returns_or_escape_codes()
    {
        Assert.That(_run.Output, Does.Not.Contain("\r"), "no redraw in place when the output is not a terminal");
        Assert.That(_run.Output, Does.Not.Contain("\u001b["), "no ANSI escape codes");
    }

    [Test]
    public void A_pinned_page_makes_the_dry_run_and_the_offline_fail_naming_the_pin_until_it_is_released()
    {
        Assert.That(_run.Output, Does.Match(@"CanOffline\(memory\d+\) \(a dry run, changes nothing\): no"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"Pinned: frame \d+ is pinned \(1 pin\)"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"Offline of memory\d+ with offline_migrate_max_passes = 3: EBUSY after 3 passes"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"The pin released: CanOffline\(memory\d+\): yes\."), _run.ToString());
    }

    [Test]
    public void The_block_comes_online_again_in_its_default_zone()
    {
        Assert.That(_run.Output, Does.Match(@"Online of memory\d+ \(valid_zones ""Movable[^""]*"": the first is the default\): success; state online, zone Movable"), _run.ToString());
    }

    [Test]
    public void Max_passes_is_the_number_of_passes_the_pinned_offline_makes()
    {
        VmmResult result = VmmRun.Run([.. Small, "--max-passes", "1"]);

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output, Does.Match(@"offline_migrate_max_passes = 1: EBUSY after 1 pass,"), result.ToString());
    }

    [TestCase("--processes", "1")]
    [TestCase("--processes", "17")]
    [TestCase("--process-mib", "0")]
    [TestCase("--process-mib", "lots")]
    [TestCase("--max-passes", "0")]
    [TestCase("--timeout-seconds", "0")]
    [TestCase("--block-size-mib", "3")]
    [TestCase("--node-size-mib", "-1")]
    [TestCase("--bogus", "1")]
    [TestCase("--nodes", "2")]
    public void A_bad_option_exits_2_naming_it(string option, string value)
    {
        VmmResult result = VmmRun.Run(["hotplug", option, value]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain(option), result.ToString());
        Assert.That(result.Output, Does.Not.Contain("memory hot-remove"), $"refused before any machine is built; {result}");
    }

    [Test]
    public void A_node_of_one_block_has_no_movable_block_to_offline_and_exits_2()
    {
        VmmResult result = VmmRun.Run(["hotplug", "--node-size-mib", "16", "--block-size-mib", "16", "--process-mib", "1"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("must hold at least two blocks of --block-size-mib (16)"), result.ToString());
    }

    [Test]
    public void Buffers_that_do_not_fit_in_half_a_node_exit_2_before_any_machine_is_built()
    {
        VmmResult result = VmmRun.Run(["hotplug", "--node-size-mib", "64", "--block-size-mib", "16", "--processes", "4", "--process-mib", "9"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("must fit in half a node (32 MiB)"), result.ToString());
    }
}

/// <summary>The check at the end of `vmm hotplug`: a wrong byte anywhere in a buffer is found.</summary>
public sealed class HotplugDemoCheckTests
{
    [Test]
    public void A_buffer_as_written_verifies_and_a_byte_changed_behind_the_writers_back_is_found()
    {
        using var machine = new Machine(MachineOptions.Small with { BackgroundThreads = false });
        VmProcess process = machine.CreateProcess();
        const int pages = 8;
        ulong va = process.Mmap(pages * Topology.PageSize);
        var demo = new HotplugDemo.DemoProcess(0, process, va, pages);
        demo.Fill();
        demo.Start();
        Thread.Sleep(20);
        demo.Stop();
        Assert.That(demo.Failure, Is.Null);
        Assert.That(demo.Writes, Is.GreaterThan(0), "the writer ran");
        Assert.That(demo.Verify(), Is.Null, "every page holds what was written, the writer's stamps included");

        // A byte past the stamp of a private page: the writer never rewrites it, so only the check sees it.
        ulong corrupt = demo.PrivateAddress + Topology.PageSize + 100;
        process.Write<byte>(corrupt, (byte)(process.Read<byte>(corrupt) ^ 0xFF));

        Assert.That(demo.Verify(), Does.Contain("page 5 (private half), byte 100"), "the changed byte is named");
    }
}
