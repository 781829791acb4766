// Usage: the vmm command's exit codes, its "bad arguments" exception, and integer options that know
// their range. A value out of range is a parse error that names the option ("--nodes must be 1 to
// 64"), so it is refused before any machine is built, with exit code 2 like every other bad argument.
using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;
using System.CommandLine.Help;
using System.CommandLine.Invocation;

namespace Vmm.Cli;

/// <summary>The exit codes of `vmm`, listed by `--help`.</summary>
internal static class ExitCodes
{
    /// <summary>The run completed and every Audit was clean.</summary>
    public const int Success = 0;

    /// <summary>An Audit found a problem (a counting or mapping inconsistency in Vmm).</summary>
    public const int AuditProblem = 1;

    /// <summary>
    /// Bad arguments: an unknown option, a value out of range, options that cannot work together; for
    /// `dedupe` also a named path that could not be used (the other paths are still processed).
    /// </summary>
    public const int BadArguments = 2;

    /// <summary>
    /// An unexpected exception: a bug in vmm or Vmm (the exception is printed). Distinct from 1 so that
    /// a crash never reads as an Audit verdict.
    /// </summary>
    public const int InternalError = 3;

    /// <summary>The help section.</summary>
    public const string HelpText =
        """
        Exit codes:
          0  success
          1  an Audit found a problem
          2  bad arguments (unknown option, value out of range; for dedupe also a path that could not be used)
          3  internal error (an unexpected exception: a bug, please report it)
        """;
}

/// <summary>
/// A bad argument found after parsing (a combination of options that cannot work, a path that cannot
/// be used): the message is for the user, the exit code is 2.
/// </summary>
internal sealed class UsageException(string message) : Exception(message);

/// <summary>Integer options with a range, and the help that lists the exit codes.</summary>
internal static class Usage
{
    /// <summary>An int option whose value must lie in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public static Option<int> IntOption(string name, string description, int defaultValue, int min, int max)
    {
        var option = new Option<int>(name) { Description = $"{description} [{min}..{max}]", DefaultValueFactory = _ => defaultValue };
        option.Validators.Add(result =>
        {
            if (ValueOf(result) is int value && (value < min || value > max))
                result.AddError($"{name} must be {min} to {max} (got {value})");
        });
        return option;
    }

    /// <summary>A block-size option: a power of two from 2 MiB (one pageblock) to 64 GiB.</summary>
    public static Option<int> BlockSizeOption(string description)
    {
        const int min = 2, max = 1 << 16;
        var option = new Option<int>("--block-size-mib") { Description = $"{description} [a power of two, {min}..{max}]", DefaultValueFactory = _ => 128 };
        option.Validators.Add(result =>
        {
            if (ValueOf(result) is int value && (value < min || value > max || (value & (value - 1)) != 0))
                result.AddError($"--block-size-mib must be a power of two from {min} to {max} (got {value})");
        });
        return option;
    }

    /// <summary>The option's value; null if it is not a number (the parser reports that itself).</summary>
    private static int? ValueOf(OptionResult result)
    {
        if (result.Tokens.Count == 0)
            return result.GetValueOrDefault<int>(); // the default
        return int.TryParse(result.Tokens[^1].Value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int value) ? value : null;
    }

    /// <summary>Makes the help of <paramref name="root"/> and of every subcommand end with the exit codes.</summary>
    public static void AddExitCodesToHelp(RootCommand root)
    {
        foreach (HelpOption help in root.Options.OfType<HelpOption>())
        {
            if (help.Action is HelpAction standard)
                help.Action = new HelpWithExitCodes(standard);
        }
    }

    /// <summary>The standard help, then the exit codes.</summary>
    internal sealed class HelpWithExitCodes(HelpAction standard) : SynchronousCommandLineAction
    {
        public override int Invoke(ParseResult parseResult)
        {
            int result = standard.Invoke(parseResult);
            parseResult.InvocationConfiguration.Output.WriteLine(ExitCodes.HelpText);
            return result;
        }
    }

    /// <summary>Builds a machine; options that Vmm refuses (an ArgumentException) are bad arguments.</summary>
    /// <exception cref="UsageException">Vmm refused the options.</exception>
    public static Machine CreateMachine(MachineOptions options)
    {
        try
        {
            return new Machine(options);
        }
        catch (ArgumentException e)
        {
            throw new UsageException($"the machine cannot be built with these options: {e.Message}");
        }
    }
}
