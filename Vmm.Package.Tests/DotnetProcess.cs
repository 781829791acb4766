// DotnetProcess: runs the dotnet CLI as a child process with a deadline, for the package test.
//
// Two things keep a child `dotnet build` from outliving the test or hanging it: MSBuild node reuse and
// the compiler server are off (a long-lived node inherits the redirected stdout pipe, and reading to
// the end would then wait for it), and the output is read asynchronously while waiting with a timeout;
// a child past its deadline is killed with its whole tree.
using System.Diagnostics;
using System.Text;

namespace Vmm.Package.Tests;

/// <summary>The outcome of one child dotnet command.</summary>
/// <param name="ExitCode">its exit code, or null if it was killed at the deadline.</param>
/// <param name="Output">stdout and stderr, interleaved.</param>
public sealed record DotnetResult(string Command, int? ExitCode, string Output)
{
    public override string ToString() => $"`dotnet {Command}`: exit code {ExitCode?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none (killed at the deadline)"}\n{Output}";
}

public static class DotnetProcess
{
    /// <summary>Runs `dotnet <paramref name="arguments"/>` in <paramref name="workingDirectory"/>.</summary>
    public static DotnetResult Run(string workingDirectory, TimeSpan deadline, params string[] arguments)
    {
        var start = new ProcessStartInfo("dotnet")
        {
            WorkingDirectory = workingDirectory,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (string argument in arguments)
            start.ArgumentList.Add(argument);
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        start.Environment["DOTNET_NOLOGO"] = "1";
        start.Environment["DOTNET_SKIP_FIRST_TIME_EXPERIENCE"] = "1";
        start.Environment["MSBUILDDISABLENODEREUSE"] = "1";
        start.Environment["DOTNET_CLI_USE_MSBUILD_SERVER"] = "0";
        start.Environment["UseSharedCompilation"] = "false";
        // The test host's own variables must not leak into the child's build or run.
        start.Environment.Remove("MSBuildExtensionsPath");
        start.Environment.Remove("MSBuildSDKsPath");
        start.Environment.Remove("MSBUILD_EXE_PATH");

        var output = new StringBuilder();
        using var process = new Process { StartInfo = start };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        process.Start();
        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        string command = string.Join(' ', arguments);
        if (!process.WaitForExit(deadline))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
            lock (output)
                return new DotnetResult(command, null, output.ToString());
        }
        process.WaitForExit(); // drains the asynchronous readers
        lock (output)
            return new DotnetResult(command, process.ExitCode, output.ToString());
    }
}
