using Spectre.Console;

namespace Vmm.Cli.Tests;

/// <summary>The command line itself: unknown options, ranges, exit codes and the help that lists them.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class ArgumentTests
{
    [Test]
    public void An_unknown_option_is_an_error_not_a_path()
    {
        VmmResult result = VmmRun.Run(["dedupe", "--bogus", "x"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("unknown option --bogus"), result.ToString());
        Assert.That(result.Output, Does.Not.Contain("no such file").IgnoreCase, $"--bogus was not opened as a file; {result}");
    }

    [TestCase("-x")]
    [TestCase("--bogus")]
    public void An_unknown_option_of_the_root_command_is_an_error(string option)
    {
        VmmResult result = VmmRun.Run([option]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain(option), result.ToString());
    }

    [TestCase("--nodes", "0")]
    [TestCase("--nodes", "65")]
    [TestCase("--node-size-mib", "-1")]
    [TestCase("--buffer-mib", "0")]
    [TestCase("--processes", "100000")]
    [TestCase("--processes", "1")]
    [TestCase("--block-size-mib", "3")]
    [TestCase("--block-size-mib", "1")]
    [TestCase("--touch-mib", "-5")]
    [TestCase("--pages-to-scan", "-1")]
    [TestCase("--sleep-millisecs", "-1")]
    [TestCase("--timeout-seconds", "0")]
    [TestCase("--nodes", "many")]
    public void A_machine_option_out_of_range_exits_2_naming_the_option(string option, string value)
    {
        VmmResult result = VmmRun.Run([option, value]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain(option), $"the message names the option; {result}");
    }

    [TestCase("machine", "--nodes", "0")]
    [TestCase("dedupe", "--max-file-mib", "0")]
    [TestCase("dedupe", "--max-total-mib", "-3")]
    [TestCase("dedupe", "--block-size-mib", "3")]
    public void A_subcommand_option_out_of_range_exits_2_naming_the_option(string command, string option, string value)
    {
        VmmResult result = VmmRun.Run([command, option, value, "some-path"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain($"{option} must be"), result.ToString());
    }

    [Test]
    public void Options_that_cannot_work_together_exit_2_naming_them()
    {
        VmmResult result = VmmRun.Run(["machine", "--node-size-mib", "6", "--block-size-mib", "4"]);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("--node-size-mib (6) must be a multiple of --block-size-mib (4)"), result.ToString());
    }

    [TestCase("")]
    [TestCase("dedupe")]
    [TestCase("machine")]
    [TestCase("numa")]
    [TestCase("hotplug")]
    public void Help_of_the_root_and_of_each_subcommand_lists_the_exit_codes(string command)
    {
        VmmResult result = VmmRun.Run(command.Length == 0 ? ["--help"] : [command, "--help"]);

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output, Does.Contain("Exit codes:"), result.ToString());
        foreach (string line in new[] { "0  success", "1  an Audit found a problem", "2  bad arguments", "3  internal error" })
            Assert.That(result.Output, Does.Contain(line), result.ToString());
    }

    [Test]
    public void An_unexpected_exception_exits_3_never_1_which_means_an_audit_problem()
    {
        var text = new StringWriter();
        IAnsiConsole console = AnsiConsole.Create(new AnsiConsoleSettings { Ansi = AnsiSupport.No, Out = new AnsiConsoleOutput(text) });

        int exitCode = Program.Guard(console, text, () => throw new InvalidOperationException("boom"));

        Assert.That(exitCode, Is.EqualTo(3), text.ToString());
        Assert.That(text.ToString(), Does.Contain("internal error").And.Contain("boom"), "the exception is printed");
    }

    [Test]
    public void A_bad_argument_found_after_parsing_exits_2()
    {
        var text = new StringWriter();
        IAnsiConsole console = AnsiConsole.Create(new AnsiConsoleSettings { Ansi = AnsiSupport.No, Out = new AnsiConsoleOutput(text) });

        int exitCode = Program.Guard(console, text, () => throw new UsageException("--thing is wrong"));

        Assert.That(exitCode, Is.EqualTo(2), text.ToString());
        Assert.That(text.ToString(), Does.Contain("--thing is wrong"));
    }

    [Test]
    public void The_machine_command_runs_a_small_machine_and_exits_0()
    {
        VmmResult result = VmmRun.Run(["machine", "--nodes", "1", "--node-size-mib", "8", "--block-size-mib", "2", "--touch-mib", "1"]);

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
    }
}
