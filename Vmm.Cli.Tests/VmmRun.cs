// VmmRun: runs the vmm command in-process (Program.Run) with a console that writes to a string, on a
// worker thread with a deadline, so that a command that hangs (the FIFO bug) fails its test instead of
// hanging the test run.
using System.Runtime.InteropServices;
using Spectre.Console;

namespace Vmm.Cli.Tests;

/// <summary>What one run of vmm printed and returned.</summary>
/// <param name="ExitCode">the exit code, or null if it did not finish in time.</param>
/// <param name="Output">everything the console, the help and the error writer printed.</param>
internal sealed record VmmResult(int? ExitCode, string Output)
{
    public override string ToString() => $"exit code {ExitCode?.ToString() ?? "none (timed out)"}; output:\n{Output}";
}

internal static partial class VmmRun
{
    /// <summary>Long enough for a small dedupe run on a loaded CI machine; a hang is forever.</summary>
    public static readonly TimeSpan Deadline = TimeSpan.FromSeconds(60);

    /// <summary>Runs `vmm args...`; <paramref name="onTimeout"/> may unblock a stuck run.</summary>
    public static VmmResult Run(string[] args, Action? onTimeout = null)
    {
        var text = new StringWriter();
        var writer = TextWriter.Synchronized(text);
        IAnsiConsole console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.No,
            ColorSystem = ColorSystemSupport.NoColors,
            Interactive = InteractionSupport.No,
            Out = new AnsiConsoleOutput(writer),
        });
        console.Profile.Width = 200;
        var run = Task.Factory.StartNew(() => Program.Run(args, console, writer, writer), TaskCreationOptions.LongRunning);
        if (!run.Wait(Deadline))
        {
            onTimeout?.Invoke();
            lock (writer) // the synchronized writer locks itself: read what the stuck run printed so far
                return new VmmResult(null, text.ToString());
        }
        return new VmmResult(run.Result, text.ToString());
    }

    /// <summary>Creates a FIFO (named pipe) at <paramref name="path"/>.</summary>
    public static void MakeFifo(string path)
    {
        if (mkfifo(path, 0b110_100_100) != 0)
            throw new IOException($"mkfifo {path}: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
    }

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int mkfifo(string path, uint mode);
}
