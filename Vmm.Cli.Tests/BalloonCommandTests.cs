namespace Vmm.Cli.Tests;

/// <summary>`vmm balloon`: the balloon demo runs clean, shows what it promises, and refuses bad options.</summary>
[TestFixture]
[Category("Smoke")]
[Category("Compaction")]
public sealed class BalloonCommandTests
{
    /// <summary>A small machine: 2 nodes x 64 MiB in 16 MiB blocks (two ZONE_MOVABLE blocks per node).</summary>
    private static readonly string[] Small = ["balloon", "--node-size-mib", "64", "--block-size-mib", "16", "--process-mib", "16", "--inflate-mib", "24"];

    private static VmmResult _run = null!;

    [OneTimeSetUp]
    public void RunOnce() => _run = VmmRun.Run(Small);

    [Test]
    public void The_balloon_command_runs_and_exits_0_with_a_clean_audit()
    {
        Assert.That(_run.ExitCode, Is.EqualTo(0), _run.ToString());
        Assert.That(_run.Output, Does.Contain("Audit (every list, counter, mapcount and refcount recounted): clean"), _run.ToString());
    }

    [Test]
    public void It_inflates_and_shows_the_zones_and_the_balloon_counters()
    {
        Assert.That(_run.Output, Does.Match(@"Inflate\(6,144 pages\) took 6,144 pages \(24\.0 MiB\)"), _run.ToString());
        foreach (string word in new[] { "managed MiB", "free MiB", "Node 0", "Node 1", "balloon_inflate", "balloon_deflate", "balloon_migrate", "Host RSS" })
            Assert.That(_run.Output, Does.Contain(word), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"balloon_inflate\s*│\s*6,144"), _run.ToString());
    }

    [Test]
    public void A_movable_block_holding_balloon_pages_goes_offline_and_they_migrate()
    {
        Assert.That(_run.Output, Does.Match(@"memory\d+ is offline: [1-9][\d,]* pages moved"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"balloon_migrate\s*│\s*[1-9][\d,]*"), $"balloon_migrate counted the moves; {_run}");
    }

    [Test]
    public void It_deflates_everything_it_took()
    {
        Assert.That(_run.Output, Does.Match(@"Deflate\(6,144 pages\) returned 6,144 pages"), _run.ToString());
        Assert.That(_run.Output, Does.Match(@"balloon_deflate\s*│\s*6,144"), _run.ToString());
    }

    [TestCase("--inflate-mib", "0")]
    [TestCase("--inflate-mib", "65")]
    [TestCase("--process-mib", "0")]
    public void Bad_options_are_refused_with_exit_code_2(string option, string value)
    {
        VmmResult result = VmmRun.Run(["balloon", "--node-size-mib", "64", "--block-size-mib", "16", option, value]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
    }
}
